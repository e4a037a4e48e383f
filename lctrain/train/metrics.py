"""Metrics sinks (rank 0): `<run.dir>/metrics.jsonl`, TensorBoard under `<run.dir>/tb`, and a progress display."""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

from lctrain.train.checkpoint import atomic_write_text


class MetricsLogger:
    """One JSON object per logged step in metrics.jsonl and the same scalars in TensorBoard."""

    def __init__(self, run_dir: str, enabled: bool, tensorboard: bool = True, resume_step: int | None = None):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.writer = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.is_file():
            self._truncate_after(resume_step)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tb"), purge_step=resume_step and resume_step + 1)

    def _truncate_after(self, step: int) -> None:
        """A resumed run repeats the steps after its checkpoint: drop their old lines so every step appears once."""
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill
        atomic_write_text(self.path, "".join(line + "\n" for line in kept))

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(clean) + "\n")
        if self.writer is not None:
            step = record["step"]
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.writer.add_scalar(f"train/{key}" if not key.startswith("eval") else f"eval/{key}",
                                           value, step)
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class Progress:
    """tqdm bar when stdout is a terminal (or logging.progress=bar), plain lines otherwise."""

    def __init__(self, mode: str, total: int, initial: int, enabled: bool):
        self.enabled = enabled and mode != "none"
        use_bar = mode == "bar" or (mode == "auto" and sys.stdout.isatty())
        self.bar = None
        self.last_print = 0.0
        if self.enabled and use_bar:
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)

    def update(self, step: int, record: dict) -> None:
        if not self.enabled:
            return
        text = (f"loss {record['loss']:.4f} lr {record['lr']:.2e} "
                f"tok/s {record['tokens_per_s']:,.0f}")
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix_str(text, refresh=False)
            self.bar.refresh()
        else:
            print(f"step {step} {text} grad_norm {record['grad_norm']:.3f}", flush=True)

    def write(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class Throughput:
    """Tokens per second over the last logged interval."""

    def __init__(self):
        self.t0 = time.perf_counter()
        self.tokens = 0

    def add(self, tokens: int) -> None:
        self.tokens += tokens

    def rate(self) -> float:
        now = time.perf_counter()
        rate = self.tokens / max(now - self.t0, 1e-9)
        self.t0, self.tokens = now, 0
        return rate
