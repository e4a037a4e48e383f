"""`niah`: needle in a haystack over a grid of context lengths x needle depths, with a heatmap.

The haystack is real text (the `--data` file, else the run's held-out documents, else the passkey filler), cut
from a random offset so trials differ; the needle "The special magic number is 1234567." is inserted at the given
fraction of it, and the prompt ends with "What is the special magic number? The special magic number is". A trial
is right when the first number the model decodes (greedily, through its cache) is the magic number.
"""
from __future__ import annotations

from pathlib import Path

from tqdm.auto import tqdm

from lctrain.config import ConfigError
from lctrain.data.synthetic import insert_at_depth, random_digits, rng_for
from lctrain.eval.retrieval import answer_prompts

NEEDLE = "\nThe special magic number is {number}.\n"
QUESTION = "\nWhat is the special magic number? The special magic number is"
ANSWER = " {number}."
NUMBER_DIGITS = 7


def evaluate_niah(model, tokenizer, haystack: list[int], lengths: list[int], depths: list[float], trials: int = 4,
                  seed: int = 0, batch_size: int = 4, progress: bool = True) -> list[dict]:
    """One result per (length, depth): `{"length", "depth", "accuracy", "correct", "trials"}`.

    haystack: token ids of running text (tiled when shorter than a prompt needs).
    """
    if not haystack:
        raise ConfigError("eval --task niah: the haystack text is empty")
    question = tokenizer.encode(QUESTION)
    max_new = len(tokenizer.encode(ANSWER.format(number="9" * NUMBER_DIGITS))) + 1
    results = []
    cells = [(length, depth) for length in lengths for depth in depths]
    for length, depth in tqdm(cells, desc="niah", unit="cell", disable=not progress):
        rng = rng_for(seed, 4, length, int(round(depth * 1000)))
        numbers = random_digits(rng, trials, NUMBER_DIGITS)
        offsets = rng.random(trials)
        prompts = []
        for number, offset in zip(numbers, offsets):
            needle = tokenizer.encode(NEEDLE.format(number=number))
            room = length - len(needle) - len(question)
            if room < 1:
                raise ConfigError(f"eval --lengths: {length} tokens cannot hold the needle and the question "
                                  f"({len(needle) + len(question)} tokens); use longer lengths")
            start = int(offset * len(haystack))
            reps = (start + room) // len(haystack) + 1
            text = (haystack * reps)[start:start + room]
            prompts.append(insert_at_depth(text, needle, depth) + question)
        scored = answer_prompts(model, tokenizer, prompts, numbers, max_new, batch_size)
        correct = sum(s["correct"] for s in scored)
        results.append({"length": length, "depth": depth, "accuracy": correct / trials, "correct": correct,
                        "trials": trials})
    return results


def plot_heatmap(results: list[dict], path: str | Path, title: str = "needle in a haystack") -> Path:
    """Accuracy heatmap: depth (rows, top = start of the context) x length (columns)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    lengths = sorted({r["length"] for r in results})
    depths = sorted({r["depth"] for r in results})
    grid = np.full((len(depths), len(lengths)), np.nan)
    for r in results:
        grid[depths.index(r["depth"]), lengths.index(r["length"])] = r["accuracy"]
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(lengths), 1.0 + 0.6 * len(depths)))
    image = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    for i in range(len(depths)):
        for j in range(len(lengths)):
            if not np.isnan(grid[i, j]):
                ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=8)
    fig.colorbar(image, ax=ax, label="accuracy")
    ax.set_title(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
