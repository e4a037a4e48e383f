"""MoA study: profile a dense attention model, search per-head elastic spans at half the density, and compare
retrieval and perplexity at 1x-4x the training length against dense attention and against a uniform sliding
window + sink (StreamingLLM-style) of the same average density.

    python bench/moa.py            # CPU: the tiny attention base of recipes/moa.yaml, ~10 minutes

Steps, all through lctrain's command line:
  1. base: `python -m lctrain recipes/moa.yaml` (reused when the run directory already has a checkpoint; the
     context-extension study trains the same base);
  2. `moa profile` at 256 and 512 tokens on the run's held-out documents over the rules alpha in {16, 32, 64, 128}
     x beta in {0, 1/8, 1/4, 1/2, 1} (every head keeps at least 16 recent + 16 sink tokens), `moa search
     --density 0.5`;
  3. a uniform plan per evaluation length N: one window for every head, with the MoA plan's sink, whose density
     at N is the MoA plan's mean density at N;
  4. `eval --task ppl` (held-out standard-library files) and `--task passkey` at 256/512/1024 for dense, uniform and
     MoA (`--attn-plan`). No plan is trained: MoA is applied to the dense model as it is.
Writes bench/results/moa_<cpu|gpu>.{json,png} and prints the tables.
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
from eval_runs import ROOT, bench_env, ensure_base, evaluate, held_out_text, plot, run, table  # noqa: E402


def plan_density(plan: dict, length: int) -> float:
    from lctrain.moa.plan import head_windows, plan_sink
    from lctrain.moa.rules import density

    sink = plan_sink(plan)
    values = [density(int(w), sink, length) for layer in plan["layers"]
              for w in head_windows(plan, int(layer), length)]
    return sum(values) / len(values)


def uniform_window(target: float, sink: int, length: int) -> int:
    """The window whose density (with `sink`) at `length` is closest to `target`."""
    from lctrain.moa.rules import density
    return min(range(1, length + 1), key=lambda w: abs(density(w, sink, length) - target))


def main() -> None:
    from lctrain.moa.plan import load_plan, save_plan, uniform_plan
    from lctrain.moa.rules import Rule

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs-dir", default=str(ROOT / "runs" / "context_extension"),
                   help="holds the base run (shared with context_extension.py) and this study's files")
    p.add_argument("--out-dir", default=str(ROOT / "bench" / "results"))
    p.add_argument("--base-steps", type=int, help="training steps of the base (default: the recipe's)")
    p.add_argument("--density", type=float, default=0.5)
    p.add_argument("--docs", type=int, default=8, help="calibration windows per profiled length")
    p.add_argument("--trials", type=int, default=20, help="passkey prompts per length")
    args = p.parse_args()
    runs, out_dir = Path(args.runs_dir), Path(args.out_dir)
    work = runs / "moa"
    work.mkdir(parents=True, exist_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    env = bench_env()
    started = time.time()
    py = sys.executable
    base = ensure_base(runs, args.base_steps, env)
    sink = 16
    run([py, "-m", "lctrain", "moa", "profile", str(base), "--lengths", "256,512", "--docs", str(args.docs),
         "--sink", str(sink), "--alphas", "16,32,64,128", "--betas", "0,0.125,0.25,0.5,1", "--response", "32",
         "--no-progress", "--out", str(work / "profile.pt")], env)
    run([py, "-m", "lctrain", "moa", "search", str(work / "profile.pt"), "--density", str(args.density),
         "--out", str(work / "plan.json")], env)
    plan = load_plan(work / "plan.json")
    lengths = [256, 512, 1024]
    data = held_out_text(work / "held_out.jsonl", 10)
    evals = work / "evals"
    evals.mkdir(exist_ok=True)
    spec = ",".join(map(str, lengths))
    results = {"dense": evaluate(base, spec, data, args.trials, evals, env, tag="_dense"),
               f"MoA (density {args.density:g})": evaluate(base, spec, data, args.trials, evals, env, tag="_moa",
                                                         extra=("--attn-plan", str(work / "plan.json")))}
    uniform = {"ppl": {}, "passkey": {}}
    windows, densities = {}, {}
    layers = [int(layer) for layer in plan["layers"]]
    for n in lengths:
        densities[n] = plan_density(plan, n)
        windows[n] = uniform_window(densities[n], sink, n)
        path = save_plan(uniform_plan(Rule(float(windows[n]), 0.0), layers, plan["n_heads"], sink),
                         work / f"uniform_{n}.json")
        r = evaluate(base, str(n), data, args.trials, evals, env, tag=f"_uniform{n}", extra=("--attn-plan", str(path)))
        uniform["ppl"][n], uniform["passkey"][n] = r["ppl"][n], r["passkey"][n]
    results["uniform window + sink"] = uniform
    kind = "gpu" if os.environ.get("CUDA_VISIBLE_DEVICES") not in (None, "") else "cpu"
    print(table(results, lengths))
    print("MoA mean density: " + ", ".join(f"{densities[n]:.3f}@{n}" for n in lengths)
          + "; uniform windows: " + ", ".join(f"{windows[n]}@{n}" for n in lengths) + f" (+ sink {sink})")
    payload = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "lengths": lengths,
               "density_budget": args.density, "moa_density": densities, "uniform_windows": windows, "sink": sink,
               "plan_summary": {**plan.get("summary", {}), "source": os.path.relpath(base, ROOT)}, "passkey_trials": args.trials, "results": results,
               "seconds": round(time.time() - started)}
    (out_dir / f"moa_{kind}.json").write_text(json.dumps(payload, indent=1))
    plot(results, lengths, out_dir / f"moa_{kind}.png", train_len=256)
    print(f"wrote {out_dir / f'moa_{kind}.json'} and .png")


if __name__ == "__main__":
    main()
