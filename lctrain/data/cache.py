"""Build-once cache directories that are safe against crashes and concurrent processes.

A cache entry is a directory `<root>/<key>/` that exists only when complete: it is written under a temporary name
beside it and renamed into place (a rename within one file system is atomic), so a killed run leaves at most a
stale temporary directory, never a half entry. Several processes (the ranks of one job, or two jobs sharing a
cache) serialise on an `fcntl.flock` of `<root>/<key>.lock`: the first builds, the others block on the lock and
then find the finished entry. No torch.distributed is needed.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator


def stable_hash(obj, length: int = 20) -> str:
    """Hex digest of a JSON-able object, independent of dict order and of the process."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:length]


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on `path` (created if needed) for the duration of the block."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def build_once(root: Path, key: str, build: Callable[[Path], None]) -> Path:
    """Return `<root>/<key>`, calling `build(tmp_dir)` to fill it first if it does not exist yet.

    `build` writes everything into the empty directory it is given; that directory becomes the entry only when
    `build` returns normally.
    """
    final = Path(root) / key
    if final.is_dir():
        return final
    with file_lock(Path(root) / f"{key}.lock"):
        if final.is_dir():  # another process built it while we waited for the lock
            return final
        for stale in Path(root).glob(f"{key}.tmp-*"):  # left by a killed build; we hold the lock, so not in use
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(root) / f"{key}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True)
        try:
            build(tmp)
            _fsync_dir_files(tmp)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


def _fsync_dir_files(directory: Path) -> None:
    """Flush the entry's files before the rename publishes it, so a power cut cannot expose empty files."""
    for path in directory.iterdir():
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
