"""Recall study: MQAR accuracy vs number of key-value pairs for pure GDN, GDN:attention hybrids and attention.

    python bench/recall.py --quick      # CPU, minutes per model: T = 64, up to 12 pairs, 2000 steps of 32
    python bench/recall.py              # longer training, T = 128, up to 24 pairs (CPU: hours; minutes on a GPU)

Every model trains with `recipes/mqar_hybrid.yaml` at the same width (only `model.pattern`, and for 6:1 the depth,
differ) and is scored with `python -m lctrain eval RUN --task mqar`. Training puts the loss on the answers only
(the value after each query key, as in Zoology) and mixes documents with 2 ... max pairs, so one model is
evaluated at every pair count. The GDN state is kept small (2 heads of key dim 8) so that pure GDN's fixed
state saturates within the grid while attention's KV cache grows with the context.

The question ("A Systematic Analysis of Hybrid Linear Attention"): does recall rise with the share of
full-attention layers, and how does it fall with more pairs? Models: `G` (pure GDN), `GGGGGGA` (6:1), `GGGA`
(3:1), `A` (attention), all 4 layers except 6:1, which needs 7 (`--depth 7` trains every model with 7 layers;
`GGGA` then repeats to `GGGAGGG`).
Writes bench/results/recall_<cpu|gpu>[_quick].{json,png} (+ a table on stdout).
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
RECIPE = "recipes/mqar_hybrid.yaml"
# label -> (pattern, layers at the default depth); the 6:1 period needs 7 layers.
MODELS = {"G": ("G", 4), "GGGGGGA (6:1)": ("GGGGGGA", 7), "GGGA (3:1)": ("GGGA", 4), "A": ("A", 4)}


def _mqar_sources(max_pairs: int, task_vocab: int) -> str:
    """A `data.sources` override: equal parts of documents with 2, 4, 8, ... up to `max_pairs` pairs."""
    counts = sorted({2, 4, *range(8, max_pairs + 1, 4)})
    entries = [f"{{type: mqar, num_kv_pairs: {n}, task_vocab: {task_vocab}, seed: {i}}}"
               for i, n in enumerate(counts)]
    return f"data.sources=[{', '.join(entries)}]"


def _run(cmd: list[str], env: dict) -> None:
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{proc.stderr[-2000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short training and a small grid (CPU minutes)")
    parser.add_argument("--steps", type=int, help="training steps per model")
    parser.add_argument("--gdn-key-dim", type=int, default=0, help="GDN head key dim (0: the recipe's 8)")
    parser.add_argument("--lr", type=float, help="peak learning rate (default: 1e-2 quick, the recipe's otherwise)")
    parser.add_argument("--depth", type=int, default=0, help="layers for every model (0: 4, and 7 for 6:1)")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of the labels")
    parser.add_argument("--out-dir", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--runs-dir", default=str(ROOT / "runs" / "recall"))
    args = parser.parse_args()
    steps = args.steps or (2000 if args.quick else 4000)
    lr = args.lr or (1e-2 if args.quick else None)
    # Quick: 16 keys and 16 values, small enough for a tiny model to learn the embeddings in minutes.
    seq_len, max_pairs, task_vocab = (64, 12, 32) if args.quick else (128, 24, 64)
    eval_pairs = [2, 4, 8, 12] if args.quick else [4, 8, 12, 16, 24]
    common = [f"train.steps={steps}", "train.micro_batch_size=32", *([f"train.lr={lr}"] if lr else []),
              f"train.warmup_steps={max(steps // 20, 1)}", f"data.seq_len={seq_len}",
              _mqar_sources(max_pairs, task_vocab),
              "train.eval_interval=0", "checkpoint.interval=0", "logging.progress=none", "logging.tensorboard=false",
              "checkpoint.resume=false",
              *([f"model.mixers.gdn.head_k_dim={args.gdn_key_dim}"] if args.gdn_key_dim else [])]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    chosen = [label.strip() for label in args.models.split(",")]
    rows = []
    for label in chosen:
        pattern, layers = MODELS[label]
        layers = args.depth or layers
        run_dir = Path(args.runs_dir) / pattern
        t0 = time.time()
        _run([sys.executable, "-m", "lctrain", RECIPE, f"run.dir={run_dir}", f"model.pattern={pattern}",
              f"model.n_layers={layers}", *common], env)
        train_s = time.time() - t0
        out = run_dir / "mqar.json"
        _run([sys.executable, "-m", "lctrain", "eval", str(run_dir), "--task", "mqar", "--lengths", str(seq_len),
              "--kv-pairs", ",".join(map(str, eval_pairs)), "--task-vocab", str(task_vocab), "--trials", "256",
              "--out", str(out), "--no-progress", "--no-tensorboard"], env)
        for r in json.loads(out.read_text())["results"]:
            rows.append({"model": label, "pattern": pattern, "n_layers": layers, "seq_len": r["seq_len"],
                         "num_kv_pairs": r["num_kv_pairs"], "accuracy": r["accuracy"], "train_s": round(train_s, 1)})
        print(f"{label}: {layers} layers, trained {steps} steps in {train_s:.0f}s", flush=True)
    print(f"\n{'model':16s} " + " ".join(f"kv={n:<6d}" for n in eval_pairs))
    for label in chosen:
        accs = [r["accuracy"] for r in rows if r["model"] == label]
        print(f"{label:16s} " + " ".join(f"{a:<9.3f}" for a in accs))
    device = "gpu" if _has_cuda() else "cpu"
    payload = {"machine": f"{platform.processor() or platform.machine()} ({os.cpu_count()} cpus)",
               "device": device, "date": time.strftime("%Y-%m-%d"), "steps": steps, "lr": lr,
               "gdn_key_dim": args.gdn_key_dim or 8, "seq_len": seq_len,
               "train_kv_pairs": f"2..{max_pairs}", "task_vocab": task_vocab, "chance": 2 / task_vocab,
               "command": " ".join(["python", "bench/recall.py", *sys.argv[1:]]), "rows": rows}
    suffix = ("_quick" if args.quick else "") + (f"_kd{args.gdn_key_dim}" if args.gdn_key_dim else "")
    path = Path(args.out_dir) / f"recall_{device}{suffix}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1) + "\n")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from plots import plot_recall
    print(f"wrote {path} and {plot_recall(path)}")


def _has_cuda() -> bool:
    import torch
    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
