"""Cluster preemption: SIGTERM / SIGUSR1 ask the loop to finish the current step, save and exit 0."""
from __future__ import annotations

import signal


class StopRequest:
    def __init__(self):
        self.signum: int | None = None
        self._previous = {}

    def install(self) -> "StopRequest":
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. embedded use): no preemption handling
                pass
        return self

    def _handle(self, signum, frame) -> None:
        self.signum = signum

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
