"""Cluster preemption: SIGTERM / SIGUSR1 ask the loop to finish the current step, save and exit 0.

The handler only records the signal (and when it came): the loop stops at the next step boundary, where all ranks
agree on it (`agree_on_stop`), so a signal that reached one rank stops, and names, every rank. A rank stuck in a
collective when the signal comes is bounded by parallel.timeout_s (lctrain.train.watchdog), not by the signal.
"""
from __future__ import annotations

import signal
import time

import torch


class StopRequest:
    def __init__(self):
        self.signum: int | None = None
        self.requested_at: float | None = None  # time.monotonic() of the first signal
        self._previous = {}

    def install(self) -> "StopRequest":
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. embedded use): no preemption handling
                pass
        return self

    def _handle(self, signum, frame) -> None:
        if self.signum is None:
            self.signum, self.requested_at = signum, time.monotonic()

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def agree_on_stop(signum: int | None, env) -> str | None:
    """Collective: None when no rank was signalled, else the reason every rank reports, e.g.
    `signal 15 on rank 1`. Each rank contributes its own signal number in its own slot."""
    if not env.distributed:
        return f"signal {signum}" if signum else None
    import torch.distributed as dist
    slots = torch.zeros(env.world_size, dtype=torch.int64, device=env.device)
    slots[env.rank] = signum or 0
    dist.all_reduce(slots, op=dist.ReduceOp.SUM)
    got = {r: int(s) for r, s in enumerate(slots.tolist()) if s}
    if not got:
        return None
    sigs = sorted(set(got.values()))
    ranks = ", ".join(map(str, sorted(got)))
    if len(got) == env.world_size:
        return f"signal {'/'.join(map(str, sigs))}"
    return f"signal {'/'.join(map(str, sigs))} on rank {ranks}"
