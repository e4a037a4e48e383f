"""Recall study: MQAR accuracy vs number of key-value pairs for pure GDN, GDN:attention hybrids and attention.

    python bench/recall.py --quick      # CPU: T = 64, up to 12 pairs, 6000 steps of 64 (2 models at a time)
    python bench/recall.py              # T = 128, up to 24 pairs, 64 task ids (CPU: hours; minutes on a GPU)

Every model is `recipes/mqar_hybrid.yaml`'s at the same width (only `model.pattern`, and for 6:1 the depth,
differ), trained with lctrain's optimizer and schedule on documents from lctrain's MQAR generator, and scored
by `lctrain.eval.mqar` (the `eval --task mqar` code). The loss is on the answers only (the value after each
query key, as in Zoology). Each batch holds documents of one pair count, 2, 4, 8, ... max pairs in turn (what
`data.batching: per_source` does in a recipe), so one model is evaluated at every pair count.

Three things decide whether the study shows capacity rather than learning speed (all measured on this CPU):
- One pair count per batch. With the counts mixed inside each batch (as `data.sources` mixes them) a 4-layer
  GDN sat at the chance loss ln 16 for 800 steps; cycling the counts per batch it reached loss 0.001 by step
  1000. The easy batches teach the lookup, the hard ones alone only add noise.
- Getting past the plateau. Attention learns the lookup (an induction circuit) only after a long plateau in
  which it answers from the values not yet queried (0.75 at 2 pairs, 0.5 at 4): at lr 1e-3 a 4-layer model
  left it after about 3500 steps of 64 and was at 0.64 for 12 pairs by 5000; at 3e-3 or 1e-2 it stayed on it
  longer. Hence lr 1e-3 and 6000+ steps.
- GDN's state must saturate within the grid: the default key dim is 4 per head (2 heads), 8 key directions per
  layer, while attention's KV cache grows with the context. With key dim 8 a 4-layer GDN recalls 12 pairs at
  0.97, so every model looks alike.

The question ("A Systematic Analysis of Hybrid Linear Attention"): does recall rise with the share of
full-attention layers, and how does it fall with more pairs? Models: `G` (pure GDN), `GGGGGGA` (6:1), `GGGA`
(3:1), `A` (attention), all 4 layers except 6:1, which needs 7 (`--depth 7` trains every model with 7 layers;
`GGGA` then repeats to `GGGAGGG`). `--jobs` models train at once, each in its own process on its share of the
CPU threads. Writes bench/results/recall_<cpu|gpu>[_quick][_kdN][_depthN][_Nsteps][_PATTERNS].{json,png}
(+ a table on stdout).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "mqar_hybrid.yaml"
# label -> (pattern, layers at the default depth); the 6:1 period needs 7 layers.
MODELS = {"G": ("G", 4), "GGGGGGA (6:1)": ("GGGGGGA", 7), "GGGA (3:1)": ("GGGA", 4), "A": ("A", 4)}
BOS, PAD, TASK_BASE = 2, 0, 4  # the id layout of lctrain's tokenizers (`lctrain.data.synthetic.task_id_base`)


def grid(quick: bool) -> dict:
    """Sequence length, pair counts trained and evaluated, task ids."""
    if quick:  # 16 keys and 16 values, small enough for a tiny model to learn the embeddings quickly
        return {"seq_len": 64, "train_pairs": [2, 4, 8, 12], "eval_pairs": [2, 4, 8, 12], "task_vocab": 32}
    return {"seq_len": 128, "train_pairs": [4, 8, 12, 16, 24], "eval_pairs": [4, 8, 12, 16, 24], "task_vocab": 64}


def mqar_batch(rng, batch: int, seq_len: int, num_kv_pairs: int, task_vocab: int):
    """input_ids and labels `[batch, seq_len]`: `[BOS] + document`, labels only at the answers (-100 elsewhere)."""
    import torch

    from lctrain.data.synthetic import mqar_documents
    tokens, answer_at = mqar_documents(rng, batch, seq_len - 1, num_kv_pairs, task_vocab, TASK_BASE, PAD)
    body = torch.from_numpy(tokens)
    ids = torch.cat([torch.full((batch, 1), BOS, dtype=torch.long), body], dim=1)
    labels = torch.full_like(ids, -100)
    # The query key at document position p is input position p + 1; its answer is document token p + 1.
    at = torch.from_numpy(answer_at)
    next_tokens = torch.cat([body[:, 1:], body[:, :1]], dim=1)
    labels[:, 1:][at] = next_tokens[at]
    return ids, labels


def train_one(label: str, layers: int, args) -> list[dict]:
    """Train one model in this process and score it; rows for the result table."""
    import torch

    from lctrain.config import load_config
    from lctrain.data.synthetic import rng_for
    from lctrain.eval.mqar import MQARSetting, evaluate_mqar
    from lctrain.models.lm import LanguageModel
    from lctrain.train.optim import build_optimizer, lr_factor

    g = grid(args.quick)
    pattern = MODELS[label][0]
    cfg = load_config(RECIPE, [f"model.pattern={pattern}", f"model.n_layers={layers}",
                               f"model.mixers.gdn.head_k_dim={args.gdn_key_dim}", f"train.steps={args.steps}",
                               f"train.lr={args.lr}", f"train.warmup_steps={max(args.steps // 40, 1)}"])
    cfg.model.vocab_size = TASK_BASE + g["task_vocab"]
    torch.manual_seed(cfg.train.seed)
    model = LanguageModel(cfg.model)
    optimizer = build_optimizer(model, cfg.train)
    rng = rng_for(cfg.train.seed, 0)
    t0, log = time.time(), []
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = cfg.train.lr * lr_factor(step, cfg.train)
        n = g["train_pairs"][step % len(g["train_pairs"])]
        ids, labels = mqar_batch(rng, args.batch, g["seq_len"], n, g["task_vocab"])
        out = model(ids, labels=labels)
        loss = out.loss_sum / out.n_targets
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        optimizer.step()
        if (step + 1) % max(args.steps // 10, 1) == 0:
            log.append({"step": step + 1, "loss": round(loss.item(), 4), "pairs": n})
            print(f"{label}: step {step + 1}/{args.steps} loss {loss.item():.3f} ({n} pairs) "
                  f"{time.time() - t0:.0f}s", flush=True)
    train_s = time.time() - t0
    model.eval()
    results = evaluate_mqar(model, [MQARSetting(g["seq_len"], n) for n in g["eval_pairs"]], tokenizer=None,
                            task_vocab=g["task_vocab"], trials=args.trials, seed=1, progress=False)
    return [{"model": label, "pattern": pattern, "n_layers": layers, "seq_len": r["seq_len"],
             "num_kv_pairs": r["num_kv_pairs"], "accuracy": r["accuracy"], "train_s": round(train_s, 1),
             "loss_log": log} for r in results]


def _in_subprocess(label: str, layers: int, args, threads: int) -> list[dict]:
    """`train_one` in a child process (`--worker`) with `threads` torch threads."""
    rows_file = Path(args.runs_dir) / f"{MODELS[label][0]}.json"
    rows_file.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, __file__, "--worker", label, "--layers", str(layers), "--rows-out", str(rows_file),
           "--steps", str(args.steps), "--batch", str(args.batch), "--lr", str(args.lr),
           "--gdn-key-dim", str(args.gdn_key_dim), "--trials", str(args.trials), *(["--quick"] if args.quick else [])]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=None, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{label} failed:\n{proc.stderr[-2000:]}")
    return json.loads(rows_file.read_text())


def _command_line() -> str:
    """This invocation, without where its scratch files went (the results do not depend on it)."""
    argv, kept = sys.argv[1:], []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--runs-dir":
            skip = True
        elif not arg.startswith("--runs-dir="):
            kept.append(arg if " " not in arg else repr(arg))
    return " ".join(["python", "bench/recall.py", *kept])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="T = 64 and up to 12 pairs (CPU, under an hour)")
    parser.add_argument("--steps", type=int, default=6000, help="training steps per model")
    parser.add_argument("--batch", type=int, default=64, help="sequences per step")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    parser.add_argument("--gdn-key-dim", type=int, default=4, help="GDN key dim per head")
    parser.add_argument("--depth", type=int, default=0, help="layers for every model (0: 4, and 7 for 6:1)")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of the labels")
    parser.add_argument("--trials", type=int, default=256, help="evaluation documents per pair count")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="models trained at once")
    parser.add_argument("--out-dir", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--runs-dir", default=str(ROOT / "runs" / "recall"), help="per-model result files")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--layers", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--rows-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        Path(args.rows_out).write_text(json.dumps(train_one(args.worker, args.layers, args)))
        return
    chosen = [label.strip() for label in args.models.split(",")]
    unknown = [label for label in chosen if label not in MODELS]
    if unknown:
        sys.exit(f"--models: unknown {unknown}; choose from {list(MODELS)}")
    g = grid(args.quick)
    jobs = max(args.jobs, 1)
    threads = max(1, (os.cpu_count() or 1) // jobs)
    t0 = time.time()
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        depth = {label: args.depth or MODELS[label][1] for label in chosen}
        order = sorted(chosen, key=lambda label: -depth[label])  # the slow 7-layer model first
        futures = {label: pool.submit(_in_subprocess, label, depth[label], args, threads) for label in order}
        try:
            rows = [row for label in chosen for row in futures[label].result()]
        except RuntimeError as err:
            sys.exit(str(err))
    print(f"\n{'model':16s} " + " ".join(f"kv={n:<6d}" for n in g["eval_pairs"]))
    for label in chosen:
        accs = [r["accuracy"] for r in rows if r["model"] == label]
        print(f"{label:16s} " + " ".join(f"{a:<9.3f}" for a in accs))
    import torch
    device = "gpu" if torch.cuda.is_available() else "cpu"
    payload = {"machine": f"{platform.processor() or platform.machine()} ({os.cpu_count()} cpus)",
               "device": device, "date": time.strftime("%Y-%m-%d"), "steps": args.steps, "batch": args.batch,
               "lr": args.lr, "gdn_key_dim": args.gdn_key_dim, "seq_len": g["seq_len"], "jobs": jobs,
               "wall_s": round(time.time() - t0), "train_kv_pairs": g["train_pairs"], "task_vocab": g["task_vocab"],
               "chance": 2 / g["task_vocab"], "command": _command_line(),
               "rows": rows}
    suffix = ("_quick" if args.quick else "") + (f"_kd{args.gdn_key_dim}" if args.gdn_key_dim != 4 else "") \
        + (f"_depth{args.depth}" if args.depth else "") + (f"_{args.steps}steps" if args.steps != 6000 else "") \
        + ("" if args.models == ",".join(MODELS) else "_" + "_".join(MODELS[label][0] for label in chosen))
    path = Path(args.out_dir) / f"recall_{device}{suffix}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1) + "\n")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from plots import plot_recall
    print(f"wrote {path} and {plot_recall(path)}")


if __name__ == "__main__":
    main()
