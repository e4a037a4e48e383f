"""Where results go: a table on stdout, a JSON file, and the run's TensorBoard."""
from __future__ import annotations

import json
from pathlib import Path


def format_table(rows: list[dict], columns: list[str]) -> str:
    """Plain aligned table of `columns` (floats with 4 decimals)."""
    def cell(value) -> str:
        return f"{value:.4f}" if isinstance(value, float) else str(value)
    cells = [[cell(row.get(c, "")) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) if cells else len(c) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)


def write_json(path: str | Path, payload: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1) + "\n")
    return path


def log_tensorboard(run_dir: Path, step: int, scalars: dict[str, float]) -> None:
    """Add `scalars` (tag -> value) at `step` to `<run_dir>/tb`, beside the training curves."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(Path(run_dir) / "tb"))
    try:
        for tag, value in scalars.items():
            writer.add_scalar(tag, value, step)
    finally:
        writer.close()
