"""Shared steps of the long-context recipe studies (context_extension.py, moa.py): run lctrain commands, evaluate
a run with `python -m lctrain eval`, and print the results table."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(cmd: list[str], env: dict) -> None:
    print("$", " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout[-1500:]}\n{proc.stderr[-2500:]}")


def has_checkpoint(run_dir: Path) -> bool:
    return (run_dir / "checkpoints" / "latest").is_file()


def bench_env() -> dict:
    return dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONUNBUFFERED="1")


def ensure_base(runs: Path, steps: int | None, env: dict) -> Path:
    """The dense attention base of both studies: `recipes/moa.yaml` trained into runs/base unless it is there."""
    base = runs / "base"
    if not has_checkpoint(base):
        override = [f"train.steps={steps}"] if steps else []
        run([sys.executable, "-m", "lctrain", "recipes/moa.yaml", f"run.dir={base}", *override,
             "logging.progress=none"], env)
    return base


def held_out_text(path: Path, files: int) -> Path:
    """Standard-library files from the end of the sorted list, written as jsonl (training reads the first ones)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    chosen = sorted(stdlib.glob("*.py"))[-files:]
    with open(path, "w") as out:
        for source in chosen:
            out.write(json.dumps({"text": source.read_text(errors="replace")}) + "\n")
    return path


def evaluate(run_dir: Path, lengths: str, data: Path, trials: int, out_dir: Path, env: dict, tag: str = "",
             extra: tuple = ()) -> dict:
    """Perplexity on `data` and passkey accuracy at `lengths` ("256,512"); `extra` adds eval options
    (e.g. --attn-plan). Returns {"ppl": {length: ppl}, "passkey": {length: accuracy}}."""
    name = out_dir / f"{run_dir.name}{tag}"
    py = sys.executable
    run([py, "-m", "lctrain", "eval", str(run_dir), "--task", "ppl", "--lengths", lengths, "--data", str(data),
         "--no-progress", "--no-tensorboard", "--out", f"{name}_ppl.json", *extra], env)
    run([py, "-m", "lctrain", "eval", str(run_dir), "--task", "passkey", "--lengths", lengths, "--trials",
         str(trials), "--no-progress", "--no-tensorboard", "--out", f"{name}_passkey.json", *extra], env)
    ppl = json.loads(Path(f"{name}_ppl.json").read_text())["results"]
    passkey = json.loads(Path(f"{name}_passkey.json").read_text())["results"]
    return {"ppl": {r["length"]: r["ppl"] for r in ppl}, "passkey": {r["length"]: r["accuracy"] for r in passkey}}


def table(results: dict, lengths: list[int]) -> str:
    head = ["model"] + [f"ppl@{n}" for n in lengths] + [f"passkey@{n}" for n in lengths]
    rows = [head] + [[label] + [f"{r['ppl'][n]:.2f}" for n in lengths] + [f"{r['passkey'][n]:.2f}" for n in lengths]
                     for label, r in results.items()]
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in rows]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def plot(results: dict, lengths: list[int], path: Path, train_len: int | None = None) -> None:
    """Perplexity and passkey accuracy against context length, one line per model (a dotted line at the
    training length when given)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for label, r in results.items():
        a.plot(lengths, [r["ppl"][n] for n in lengths], marker="o", label=label)
        b.plot(lengths, [r["passkey"][n] for n in lengths], marker="o", label=label)
    for ax, title in ((a, "perplexity (held-out code)"), (b, "passkey accuracy")):
        if train_len:
            ax.axvline(train_len, color="grey", lw=0.8, ls=":")
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [str(n) for n in lengths])
        ax.set_xlabel("context length (tokens)")
        ax.set_title(title)
    a.set_yscale("log")
    b.set_ylim(-0.05, 1.05)
    a.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
