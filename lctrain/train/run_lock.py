"""One run per run directory: an advisory lock file, `<run.dir>/.lock`, taken before anything else is written.

The file holds the holder's host, pid, start time and a heartbeat that a background thread refreshes every
HEARTBEAT_S seconds. It is created with O_EXCL (atomic on local file systems and on NFSv3+), so of two runs
started together exactly one wins. A lock is stale, and taken over with a message, when its pid is dead on this
host, or when its heartbeat is older than STALE_AFTER_S (a holder on another host that stopped beating: a
crashed node on a shared file system). A live holder makes the second run stop with one line naming it.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path

from lctrain.config import ConfigError

LOCK_FILE = ".lock"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0


class RunDirBusy(ConfigError):
    """Another live run holds the run directory (exit code 2)."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _describe(holder: dict) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(holder.get("start_time", 0)))
    beat = time.time() - float(holder.get("heartbeat", 0))
    return (f"pid {holder.get('pid')} on host {holder.get('host')} (started {started} UTC, heartbeat "
            f"{beat:.0f} s ago)")


def stale_reason(holder: dict | None, now: float | None = None) -> str | None:
    """Why an existing lock may be taken over, or None when its holder looks alive."""
    if holder is None:
        return "the lock file is unreadable"
    now = time.time() if now is None else now
    if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
        if not _pid_alive(holder["pid"]):
            return f"pid {holder['pid']} is no longer running on this host"
        return None
    age = now - float(holder.get("heartbeat", 0))
    if age > STALE_AFTER_S:
        return f"its heartbeat is {age:.0f} s old (more than {STALE_AFTER_S:.0f} s)"
    return None


class RunLock:
    def __init__(self, run_dir: str | os.PathLike, heartbeat_s: float = HEARTBEAT_S):
        self.path = Path(run_dir) / LOCK_FILE
        self.heartbeat_s = heartbeat_s
        self.record = {"host": socket.gethostname(), "pid": os.getpid(), "start_time": time.time()}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.held = False

    def _read(self) -> dict | None:
        try:
            holder = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None
        return holder if isinstance(holder, dict) else None

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as handle:
            json.dump({**self.record, "heartbeat": time.time()}, handle)
            handle.flush()
            os.fsync(handle.fileno())
        return True

    def acquire(self, log=print) -> "RunLock":
        """Take the lock or raise RunDirBusy; `log` gets the one line said when a stale lock is taken over."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # a holder may release between our look and our try
            if self._create():
                self.held = True
                self._start_heartbeat()
                return self
            holder = self._read()
            if holder is None and self.path.exists() and time.time() - self.path.stat().st_mtime < 2:
                time.sleep(0.5)  # being written by its creator right now
                holder = self._read()
            reason = stale_reason(holder)
            if reason is None:
                raise RunDirBusy(f"run.dir: {self.path.parent} is in use by {_describe(holder)}; wait for it to "
                                 f"finish, or use another run.dir")
            # Move the stale file aside under a unique name: of two runs taking it over, one rename wins.
            aside = self.path.with_name(f"{LOCK_FILE}.stale-{os.getpid()}")
            try:
                os.replace(self.path, aside)
            except FileNotFoundError:
                continue
            os.unlink(aside)
            who = _describe(holder) if holder else "an unknown holder"
            log(f"run.dir: taking over the lock of {who}: {reason}")
        raise RunDirBusy(f"run.dir: could not take the lock {self.path}; another run keeps taking it")

    def _start_heartbeat(self) -> None:
        def beat() -> None:
            while not self._stop.wait(self.heartbeat_s):
                holder = self._read()
                if holder is None or holder.get("pid") != self.record["pid"] or \
                        holder.get("host") != self.record["host"]:
                    return  # taken over (we were presumed dead): never overwrite the new holder
                tmp = self.path.with_name(f"{LOCK_FILE}.beat-{os.getpid()}")
                try:
                    tmp.write_text(json.dumps({**self.record, "heartbeat": time.time()}))
                    os.replace(tmp, self.path)
                except OSError:
                    pass  # a full disk must not kill training; the lock just ages

        self._thread = threading.Thread(target=beat, name="lctrain-run-lock", daemon=True)
        self._thread.start()

    def release(self) -> None:
        if not self.held:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        holder = self._read()
        if holder and holder.get("pid") == self.record["pid"] and holder.get("host") == self.record["host"]:
            try:
                self.path.unlink()
            except OSError:
                pass
        self.held = False
