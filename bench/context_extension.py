"""Context extension study: a model trained at L tokens, evaluated at 1x-4x L, before and after fine-tuning at 4x L
with LoRA under plain S²-Attn (LongLoRA) or SF-Attn (SinkLoRA), the same steps and data for both.

    python bench/context_extension.py            # CPU: tiny attention base (recipes/moa.yaml), ~10 minutes

Steps, all through lctrain's command line:
  1. base: `python -m lctrain recipes/moa.yaml` (Llama-style attention, 256 tokens, stdlib text + passkey
     documents), reused when its run directory already has a checkpoint;
  2. two fine-tunes with `recipes/sinklora.yaml` from that base at 1024 tokens (RoPE interpolation x4, LoRA r=8
     with embeddings and norms trained, the same mixture at the new length): mode s2_attn and mode sf_attn;
  3. `python -m lctrain eval`: perplexity at 256/512/1024 on held-out standard-library files no run trained on,
     and passkey accuracy at the same lengths, for the base and both fine-tunes (full attention at evaluation).
Writes bench/results/context_extension_<cpu|gpu>.{json,png} and prints the tables.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eval_runs import (ROOT, bench_env, ensure_base, evaluate, has_checkpoint, held_out_text, plot,  # noqa: E402
                       run, table)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs-dir", default=str(ROOT / "runs" / "context_extension"))
    p.add_argument("--out-dir", default=str(ROOT / "bench" / "results"))
    p.add_argument("--base-steps", type=int, help="training steps of the base (default: the recipe's)")
    p.add_argument("--steps", type=int, default=60, help="fine-tuning steps per method")
    p.add_argument("--trials", type=int, default=20, help="passkey prompts per length")
    args = p.parse_args()
    runs, out_dir = Path(args.runs_dir), Path(args.out_dir)
    runs.mkdir(parents=True, exist_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    env = bench_env()
    started = time.time()
    py = sys.executable
    base = ensure_base(runs, args.base_steps, env)
    mixture = ("data.sources=[{type: stdlib, weight: 0.5}, {type: passkey, weight: 0.5, num_examples: 2000, "
               "answer_only: true}]")  # the base's mixture at the new length
    arms = {"S2-Attn + LoRA (LongLoRA)": ("s2", "s2_attn"), "SF-Attn + LoRA (SinkLoRA)": ("sf", "sf_attn")}
    for _, (name, mode) in arms.items():
        run_dir = runs / name
        if not has_checkpoint(run_dir):
            run([py, "-m", "lctrain", "recipes/sinklora.yaml", f"run.dir={run_dir}", f"checkpoint.init_from={base}",
                 f"model.mixers.attn.mode={mode}", f"train.steps={args.steps}", mixture, "logging.progress=none"],
                env)
    data = held_out_text(runs / "held_out.jsonl", 10)
    lengths = [256, 512, 1024]
    spec = ",".join(map(str, lengths))
    evals = runs / "evals"
    evals.mkdir(exist_ok=True)
    results = {"base, no fine-tuning": evaluate(base, spec, data, args.trials, evals, env)}
    for label, (name, _) in arms.items():
        results[label] = evaluate(runs / name, spec, data, args.trials, evals, env)
    kind = "gpu" if os.environ.get("CUDA_VISIBLE_DEVICES") not in (None, "") else "cpu"
    print(table(results, lengths))
    payload = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "base_len": 256, "lengths": lengths,
               "base_steps": args.base_steps, "finetune_steps": args.steps, "passkey_trials": args.trials,
               "results": results, "seconds": round(time.time() - started)}
    (out_dir / f"context_extension_{kind}.json").write_text(json.dumps(payload, indent=1))
    plot(results, lengths, out_dir / f"context_extension_{kind}.png", train_len=256)
    print(f"wrote {out_dir / f'context_extension_{kind}.json'} and .png")


if __name__ == "__main__":
    main()
