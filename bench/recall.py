"""Recall study: MQAR accuracy vs number of key-value pairs for pure GDN, GDN:attention hybrids and attention.

    python bench/recall.py --quick      # CPU, minutes: short training, small grid
    python bench/recall.py              # longer training, larger grid (CPU: tens of minutes; faster on a GPU)

At equal width and depth, every model trains with `recipes/mqar_hybrid.yaml` (only `model.pattern` differs) and
is scored with `python -m lctrain eval RUN --task mqar`. The question ("A Systematic Analysis of Hybrid Linear
Attention"): does recall rise with the share of full-attention layers, and how does it fall with more pairs?
Writes bench/results/recall_<cpu|gpu>[_quick].json (+ a table on stdout); plot with `python bench/plots.py`.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Equal depth (8 layers): 0, 1, 2 and 8 attention layers. `GGGGGGGA` is the closest 8-layer form of 6:1.
MODELS = {"G": "G", "GGGGGGGA (7:1)": "GGGGGGGA", "GGGA (3:1)": "GGGA", "A": "A"}


def _run(cmd: list[str], env: dict) -> None:
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{proc.stderr[-2000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short training and a small grid")
    parser.add_argument("--steps", type=int, help="training steps per model")
    parser.add_argument("--out-dir", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--runs-dir", default=str(ROOT / "runs" / "recall"))
    args = parser.parse_args()
    steps = args.steps or (300 if args.quick else 3000)
    seq_len, train_pairs = (64, 4) if args.quick else (128, 8)
    eval_pairs = [2, 4, 8] if args.quick else [4, 8, 16, 24]
    common = [f"model.n_layers=8", "model.d_model=64", f"train.steps={steps}", f"data.seq_len={seq_len}",
              f"data.sources=[{{type: mqar, num_kv_pairs: {train_pairs}, task_vocab: 128}}]",
              "train.eval_interval=0", "checkpoint.interval=0", "logging.progress=none", "logging.tensorboard=false",
              "checkpoint.resume=false", f"train.warmup_steps={max(steps // 20, 1)}"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    rows = []
    for label, pattern in MODELS.items():
        run_dir = Path(args.runs_dir) / pattern
        t0 = time.time()
        _run([sys.executable, "-m", "lctrain", "recipes/mqar_hybrid.yaml", f"run.dir={run_dir}",
              f"model.pattern={pattern}", *common], env)
        train_s = time.time() - t0
        out = run_dir / "mqar.json"
        _run([sys.executable, "-m", "lctrain", "eval", str(run_dir), "--task", "mqar", "--lengths", str(seq_len),
              "--kv-pairs", ",".join(map(str, eval_pairs)), "--trials", "128", "--out", str(out), "--no-progress",
              "--no-tensorboard"], env)
        for r in json.loads(out.read_text())["results"]:
            rows.append({"model": label, "pattern": pattern, "seq_len": r["seq_len"],
                         "num_kv_pairs": r["num_kv_pairs"], "accuracy": r["accuracy"], "train_s": round(train_s, 1)})
        print(f"{label}: trained {steps} steps in {train_s:.0f}s", flush=True)
    print(f"\n{'model':16s} " + " ".join(f"kv={n:<6d}" for n in eval_pairs))
    for label in MODELS:
        accs = [r["accuracy"] for r in rows if r["model"] == label]
        print(f"{label:16s} " + " ".join(f"{a:<9.3f}" for a in accs))
    device = "gpu" if _has_cuda() else "cpu"
    payload = {"machine": f"{platform.node()} {platform.processor() or platform.machine()} ({os.cpu_count()} cpus)",
               "device": device, "date": time.strftime("%Y-%m-%d"), "steps": steps, "seq_len": seq_len,
               "train_kv_pairs": train_pairs, "command": " ".join(["python", "bench/recall.py", *sys.argv[1:]]),
               "rows": rows}
    path = Path(args.out_dir) / f"recall_{device}{'_quick' if args.quick else ''}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1) + "\n")
    print(f"wrote {path}")


def _has_cuda() -> bool:
    import torch
    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
