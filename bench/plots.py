"""Plots for docs/RESULTS.md from the JSON the benchmarks write (never drawn by hand).

    python bench/plots.py      # every bench/results/{recall,train}_*.json -> a PNG beside it
"""
from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def plot_recall(path: Path) -> Path:
    data = json.loads(path.read_text())
    fig, ax = plt.subplots(figsize=(5, 3.5))
    styles = [("o", "-"), ("s", "--"), ("^", "-."), ("D", ":")]  # lines at the same accuracy stay visible
    for i, model in enumerate(dict.fromkeys(r["model"] for r in data["rows"])):
        rows = [r for r in data["rows"] if r["model"] == model]
        marker, line = styles[i % len(styles)]
        ax.plot([r["num_kv_pairs"] for r in rows], [r["accuracy"] for r in rows], marker=marker, linestyle=line,
                markersize=7 - i, label=model)
    ax.set_xlabel("key-value pairs")
    ax.set_ylabel("MQAR accuracy")
    ax.set_ylim(0, 1.05)
    ax.set_title(f"recall, T={data['seq_len']}, {data['steps']} steps ({data['device']})")
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_train(path: Path) -> Path:
    data = json.loads(path.read_text())
    rows = [r for r in data["rows"] if "tokens_per_s" in r]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for recipe in dict.fromkeys(r["recipe"] for r in rows):
        mine = [r for r in rows if r["recipe"] == recipe]
        ax.plot([r["seq_len"] for r in mine], [r["tokens_per_s"] for r in mine], marker="o", label=recipe)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sequence length T")
    ax.set_ylabel("training tokens/s")
    ax.set_title(f"throughput at {data['tokens_per_step']} tokens/step ({data['device']})")
    ax.legend(fontsize=8)
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    out = path.with_suffix(".png")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main() -> None:
    for path in sorted(RESULTS.glob("recall_*.json")):
        print(plot_recall(path))
    for path in sorted(RESULTS.glob("train_*.json")):
        print(plot_train(path))


if __name__ == "__main__":
    main()
