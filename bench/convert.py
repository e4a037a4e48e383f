"""Conversion study: a transformer converted into a 3:1 GDN hybrid and distilled for a tenth of the teacher's steps,
against the same hybrid trained from scratch for a tenth and for all of them.

    python bench/convert.py                 # CPU: recipes/convert_teacher.yaml (~0.8M parameters), N = 400

Runs, all through lctrain's command line, same data, tokenizer and held-out documents:
  teacher        recipes/convert_teacher.yaml (pattern A), N steps
  converted      recipes/convert_3to1.yaml from the teacher: align stage, then N/10 distillation steps
  scratch N/10   the teacher recipe with model.pattern=GGGA, N/10 steps
  scratch N      the same, N steps
Writes bench/results/convert_<cpu|gpu>.{json,png} and prints the table (final held-out loss of each run).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eval_runs import ROOT, bench_env, has_checkpoint, run  # noqa: E402


def eval_curve(run_dir: Path) -> list[tuple[int, float]]:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return sorted({r["step"]: r["eval_loss"] for r in lines if "eval_loss" in r}.items())


def train(recipe: str, run_dir: Path, env: dict, *overrides: str) -> float | None:
    """Train, or resume an interrupted run (a finished one only re-evaluates); the wall time of a run trained in
    one go, else None."""
    fresh = not has_checkpoint(run_dir)
    t0 = time.perf_counter()
    run([sys.executable, "-m", "lctrain", recipe, f"run.dir={run_dir}", "logging.progress=none", *overrides], env)
    return time.perf_counter() - t0 if fresh else None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs-dir", default=str(ROOT / "runs" / "convert_study"))
    p.add_argument("--out-dir", default=str(ROOT / "bench" / "results"))
    p.add_argument("--steps", type=int, default=400, help="teacher steps N")
    p.add_argument("--align-steps", type=int, default=20)
    args = p.parse_args()
    runs, out_dir = Path(args.runs_dir), Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    env = bench_env()
    n, short = args.steps, max(args.steps // 10, 1)
    interval = [f"train.eval_interval={max(short // 4, 1)}"]
    teacher = runs / "teacher"
    seconds = {"teacher": train("recipes/convert_teacher.yaml", teacher, env, f"train.steps={n}",
                                f"train.eval_interval={max(n // 10, 1)}")}
    tokenizer = teacher / "tokenizer" / "tokenizer.model"
    seconds["converted"] = train("recipes/convert_3to1.yaml", runs / "converted", env,
                                 f"checkpoint.init_from={teacher}", f"train.steps={short}",
                                 f"distill.align_steps={args.align_steps}", *interval)
    scratch = ["model.pattern=GGGA", f"data.tokenizer={tokenizer}"]
    seconds["scratch_short"] = train("recipes/convert_teacher.yaml", runs / "scratch_short", env, *scratch,
                                     f"train.steps={short}", *interval)
    seconds["scratch_long"] = train("recipes/convert_teacher.yaml", runs / "scratch_long", env, *scratch,
                                    f"train.steps={n}", f"train.eval_interval={max(n // 10, 1)}")
    names = {"teacher": f"teacher (A, {n} steps)",
             "converted": f"converted 3:1 ({args.align_steps} align + {short} distil steps)",
             "scratch_short": f"3:1 from scratch ({short} steps)", "scratch_long": f"3:1 from scratch ({n} steps)"}
    curves = {k: eval_curve(runs / k) for k in names}
    final = {k: c[-1][1] for k, c in curves.items()}
    device = "gpu" if "cuda" in env.get("LCTRAIN_BENCH_DEVICE", "") else "cpu"
    result = {"machine": f"{platform.machine()} {platform.processor() or ''}".strip(), "teacher_steps": n,
              "short_steps": short, "align_steps": args.align_steps, "final_eval_loss": final,
              "gap_to_teacher": {k: v / final["teacher"] - 1 for k, v in final.items()},
              "eval_curves": curves, "wall_s": seconds}
    (out_dir / f"convert_{device}.json").write_text(json.dumps(result, indent=1))
    print(f"| run | final eval loss | vs teacher |\n|---|---|---|")
    for k, label in names.items():
        print(f"| {label} | {final[k]:.3f} | {100 * result['gap_to_teacher'][k]:+.1f}% |")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for k, label in names.items():
        steps, losses = zip(*curves[k])
        ax.plot(steps, losses, marker="o", ms=3, label=label)
    ax.set_xscale("log")
    ax.set_xlabel("training steps (distillation steps for the converted model)")
    ax.set_ylabel("held-out loss")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / f"convert_{device}.png", dpi=120)


if __name__ == "__main__":
    main()
