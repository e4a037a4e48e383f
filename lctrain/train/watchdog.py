"""Bounded hangs: every rank publishes where it is, so a failed or hung collective can name who did not arrive.

Each rank runs a daemon thread that writes `<step> <phase> <wall time>` to the rendezvous store (a separate
client with a short timeout, so a frozen store host cannot freeze the thread) every few seconds. The loop calls
`progress(step, phase)` at its collective points. When a collective fails (gloo raises after parallel.timeout_s,
or at once when a peer died), `explain` turns the error into one line naming the ranks that are behind or whose
heartbeat stopped. If the main thread makes no progress for timeout + grace (a hang that raises nothing, e.g. a
collective on a backend without timeouts), the thread itself prints that line and ends the process with exit
code 1, so the launcher tears the job down.
"""
from __future__ import annotations

import datetime
import os
import sys
import threading
import time

from lctrain.train.errors import CollectiveTimeout

PREFIX = "lctrain/heartbeat"


def heartbeat_interval(timeout_s: float) -> float:
    return max(0.2, min(5.0, timeout_s / 4))


def grace_period(timeout_s: float) -> float:
    return max(2.0, min(60.0, timeout_s / 2))


def behind(beats: dict[int, tuple[int, int, float] | None], world: int, now: float, stale_after: float) -> list[int]:
    """Ranks that did not arrive: no heartbeat at all, a heartbeat older than `stale_after` seconds (frozen or
    dead), or a position (step, phase) behind the furthest rank."""
    known = [b for b in beats.values() if b is not None]
    front = max(((s, p) for s, p, _ in known), default=(0, 0))
    missing = []
    for rank in range(world):
        beat = beats.get(rank)
        if beat is None or now - beat[2] > stale_after or (beat[0], beat[1]) < front:
            missing.append(rank)
    return missing


def _client_store(timeout_s: float):
    import torch.distributed as dist
    host, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not host or not port:
        return None
    try:
        return dist.TCPStore(host, int(port), is_master=False, timeout=datetime.timedelta(seconds=timeout_s),
                             wait_for_workers=False)
    except Exception:  # noqa: BLE001 - no store, no names: the timeout still bounds the hang
        return None


class RankWatch:
    def __init__(self, rank: int, world: int, timeout_s: float, store=None, exit_on_hang: bool = True):
        self.rank, self.world, self.timeout_s = rank, world, float(timeout_s)
        self.interval = heartbeat_interval(self.timeout_s)
        self.grace = grace_period(self.timeout_s)
        self.exit_on_hang = exit_on_hang
        run_id = os.environ.get("TORCHELASTIC_RUN_ID", "")
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        self.prefix = f"{PREFIX}/{run_id}/{restart}"
        self.store = store if store is not None else _client_store(min(10.0, self.timeout_s))
        self.step, self.phase = 0, 0
        self.last_progress = time.monotonic()
        self.paused = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --------------------------------------------------------------------------------------- main thread
    def start(self) -> "RankWatch":
        self._publish()
        self._thread = threading.Thread(target=self._run, name="lctrain-watchdog", daemon=True)
        self._thread.start()
        return self

    def progress(self, step: int, phase: int = 0) -> None:
        self.step, self.phase = step, phase
        self.last_progress = time.monotonic()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2 * self.interval + 1)

    def explain(self, exc: BaseException, what: str) -> CollectiveTimeout:
        """One line for a failed collective: the timeout, where, the ranks that did not arrive, the cause."""
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        cause = first.split("] ", 1)[-1][:160]  # gloo prefixes its source location
        missing = self.missing(wait_s=2.5 * self.interval)
        who = (f"rank(s) {', '.join(map(str, missing))} did not arrive" if missing
               else "the ranks that did not arrive could not be told")
        return CollectiveTimeout(f"{what}: a collective failed or timed out (parallel.timeout_s={self.timeout_s:g}): "
                                 f"{who} ({cause})")

    def missing(self, wait_s: float = 0.0) -> list[int]:
        """Ranks behind or silent; waits up to `wait_s` for a dead peer's heartbeat to go stale."""
        deadline = time.time() + wait_s
        while True:
            beats = self._read_all()
            if beats is None:
                return []
            self_stale = self.interval * 2.5
            found = [r for r in behind(beats, self.world, time.time(), self_stale) if r != self.rank]
            if found or time.time() >= deadline:
                return found
            time.sleep(self.interval / 2)

    # ------------------------------------------------------------------------------------ watchdog thread
    def _publish(self) -> None:
        if self.store is None:
            return
        try:
            self.store.set(f"{self.prefix}/{self.rank}", f"{self.step} {self.phase} {time.time():.3f}")
        except Exception:  # noqa: BLE001 - the store host may be the rank that froze
            pass

    def _read_all(self) -> dict[int, tuple[int, int, float] | None] | None:
        if self.store is None:
            return None
        beats = {}
        for rank in range(self.world):
            key = f"{self.prefix}/{rank}"
            try:
                if not self.store.check([key]):
                    beats[rank] = None
                    continue
                step, phase, when = self.store.get(key).decode().split()
                beats[rank] = (int(step), int(phase), float(when))
            except Exception:  # noqa: BLE001
                return None
        return beats

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._publish()
            stalled = time.monotonic() - self.last_progress
            if self.exit_on_hang and not self.paused and stalled > self.timeout_s + self.grace:
                missing = self.missing()
                who = (f"rank(s) {', '.join(map(str, missing))} did not arrive" if missing
                       else "no rank is known to be missing")
                print(f"error: training aborted: rank {self.rank} made no progress for {stalled:.0f} s at step "
                      f"{self.step + 1} (parallel.timeout_s={self.timeout_s:g} plus {self.grace:g} s grace): {who}",
                      file=sys.stderr, flush=True)
                os._exit(1)


def is_collective_error(exc: BaseException) -> bool:
    """A collective that timed out or lost a peer (gloo raises RuntimeError, NCCL DistBackendError)."""
    import torch.distributed as dist
    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    text = str(exc)
    return any(mark in text for mark in ("gloo", "Gloo", "NCCL", "Timed out", "Connection closed by peer",
                                         "Connection reset by peer", "timed out"))
