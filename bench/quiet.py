"""How busy the machine is with other processes, so timings taken on shared machines can be judged.

Linux only (reads /proc/stat and /proc/self/stat); elsewhere every reading is None and nothing waits. The share is
the fraction of all cores' time, over a window, that processes other than this one were running.
"""
from __future__ import annotations

import os
import time


def _cpu_total_busy() -> tuple[int, int] | None:
    """(total, busy) clock ticks of all cores since boot, or None where /proc/stat is unavailable."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields[:8]), sum(fields[:8]) - idle


def _own_ticks() -> int:
    """User + system ticks of this process and its waited-for children."""
    with open("/proc/self/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return sum(int(x) for x in fields[11:15])  # utime, stime, cutime, cstime


class LoadMeter:
    """Share of the machine's CPU time used by other processes between `start()` and `stop()`."""

    def __init__(self) -> None:
        self._start: tuple[int, int, int] | None = None

    def start(self) -> None:
        tb = _cpu_total_busy()
        self._start = None if tb is None else (*tb, _own_ticks())

    def stop(self) -> float | None:
        tb = _cpu_total_busy()
        if tb is None or self._start is None:
            return None
        total0, busy0, own0 = self._start
        total, busy = tb[0] - total0, tb[1] - busy0
        own = _own_ticks() - own0
        if total <= 0:
            return None
        return max(0.0, min(1.0, (busy - own) / total))


def others_share(window_s: float = 0.25) -> float | None:
    meter = LoadMeter()
    meter.start()
    time.sleep(window_s)
    return meter.stop()


def wait_for_quiet(threshold: float = 0.15, max_wait_s: float = 30.0, window_s: float = 0.25) -> dict:
    """Sleep until other processes use less than `threshold` of the CPU (over `window_s`), at most `max_wait_s`.

    Returns {"waited_s", "share_before", "quiet"}: quiet is False when the cap was reached while still busy."""
    t0 = time.perf_counter()
    share = others_share(window_s)
    while share is not None and share >= threshold and time.perf_counter() - t0 < max_wait_s:
        share = others_share(window_s)
    return {"waited_s": time.perf_counter() - t0, "share_before": share,
            "quiet": share is None or share < threshold}


def cpu_count() -> int:
    return os.cpu_count() or 1
