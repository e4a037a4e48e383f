"""How the `python -m lctrain` process ends. Kept free of torch imports: every command goes through it."""
from __future__ import annotations

import os
import sys


def gloo_workers() -> list[str]:
    """Names of this process's gloo threads still running (Linux; [] where /proc is missing). They outlive
    `destroy_process_group` when something still holds a group, e.g. DTensor's caches under FSDP."""
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return []
    names = []
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                name = f.read().strip()
        except OSError:  # the thread ended while we listed
            continue
        if name.startswith(("pt_gloo", "gloo_")):
            names.append(name)
    return names


def leave(code: int) -> None:
    """Exit the process with `code`. With gloo threads still alive, skip interpreter finalization (`os._exit`
    after flushing stdio): a gloo worker that frees a Python-owned tensor while the interpreter finalizes aborts
    the process (SIGABRT) after a run that has already finished and saved."""
    if gloo_workers():
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):  # a closed pipe (`| head`) or stream: nothing left to save
                pass
        os._exit(code)
    sys.exit(code)
