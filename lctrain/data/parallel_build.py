"""Tokenising the missing shards: in parallel worker processes on every rank, shared out across ranks.

Each rank (a process of the job, on any node) takes the missing shards in its own order: first its share (all
shards are dealt largest first to the least loaded rank: every rank computes the same deal), then everybody
else's, trying each shard's lock without waiting. A shard whose lock is held is being built elsewhere; it is
retried at the end, this time waiting for the lock, and found built (or, if its builder died, built here). So
ranks that finish early help the slow ones, a dead rank's share is still done, and no collective is needed:
`prepare --shard i/n` uses the same code with i/n in place of rank/world and builds its share only.

A shard that fails (e.g. a bad record) stops the build with that error; every shard finished by then stays cached.
Rank 0 shows one progress bar (bytes of all missing shards, whoever builds them).
"""
from __future__ import annotations

import multiprocessing
import os
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path

from lctrain.data import shard_cache

_worker_tokenizer = None


def default_workers() -> int:
    """The cores this process may use, divided among the ranks of this node."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    local = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0]
                or 1)
    return max(1, cores // max(local, 1))


def deal(sizes: list[int], world: int) -> list[int]:
    """The owner rank of each item: largest first to the least loaded rank (ties: lowest rank)."""
    load = [0] * world
    owner = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        r = min(range(world), key=lambda r: (load[r], r))
        owner[i] = r
        load[r] += sizes[i]
    return owner


def _init_worker(model_proto: bytes) -> None:
    global _worker_tokenizer
    from lctrain.data.tokenizer import Tokenizer
    _worker_tokenizer = Tokenizer(model_proto)


def encode_in_worker(model_proto: bytes, texts: list[str]) -> list:
    """Token ids (int32 arrays) of `texts`, in a worker process (the tokenizer is loaded once per process)."""
    import numpy as np

    if _worker_tokenizer is None:
        _init_worker(model_proto)
    return [np.asarray(ids, dtype=np.int32) for ids in _worker_tokenizer.encode_batch(texts, threads=1)]


def _build_in_worker(root: str, key: str, shard, on_bad: str, blocking: bool):
    return shard_cache.build_entry(Path(root), key, shard, _worker_tokenizer, on_bad, blocking)


class _InProcess:
    """The executor interface, run inline: one worker needs no process pool."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def submit(self, fn, root, key, shard, on_bad, blocking):
        from concurrent.futures import Future
        future = Future()
        try:
            future.set_result(shard_cache.build_entry(Path(root), key, shard, self.tokenizer, on_bad, blocking))
        except BaseException as exc:  # noqa: BLE001 - delivered through the future like a pool would
            future.set_exception(exc)
        return future

    def shutdown(self, wait=True, cancel_futures=False):
        pass


def build_missing(shards: list, keys: list[str], root: Path, tokenizer, on_bad: str, rank: int = 0,
                  world: int = 1, workers: int = 1, progress: bool = False, only_mine: bool = False) -> dict:
    """Build every shard whose entry is missing (only this rank's share when `only_mine`).

    Returns stats: built (shards this process built), bytes, seconds, busy_waits and per-shard build times."""
    root = Path(root)
    missing = [i for i, key in enumerate(keys) if not (root / key).is_dir()]
    stats = {"missing": len(missing), "built": 0, "bytes": 0, "tokens": 0, "seconds": 0.0, "shard_seconds": [],
             "shard_cpu_seconds": [], "worker_rss_mib": []}
    if not missing:
        return stats
    # Dealt over all shards, not the missing ones: a share is the same whatever other shares finished already.
    owner = deal([shard.size for shard in shards], world)
    mine = [i for i in missing if owner[i] == rank]
    others = [] if only_mine else [i for i in missing if owner[i] != rank]
    # Others' shards from a rank-dependent starting point, so idle ranks do not all queue on the same lock.
    if others:
        turn = (rank * len(others)) // max(world, 1)
        others = others[turn:] + others[:turn]
    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm
        total = sum(shards[i].size for i in (missing if not only_mine else mine))
        bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"tokenising {len(missing)} shards")
    t0 = time.perf_counter()
    workers = max(1, min(workers, len(mine) + len(others)))
    if workers == 1:
        pool = _InProcess(tokenizer)
    else:
        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_init_worker, initargs=(tokenizer.model_proto,))
    try:
        queue = [(i, False) for i in mine + others]
        running = {}
        retry = []
        while queue or running or retry:
            if not queue and not running:
                queue, retry = [(i, True) for i in retry], []
            while queue and len(running) < 2 * workers:  # a little ahead, so workers never idle
                i, blocking = queue.pop(0)
                running[pool.submit(_build_in_worker, str(root), keys[i], shards[i], on_bad, blocking)] = i
            done, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for future in done:
                i = running.pop(future)
                status, meta = future.result()  # a failed shard raises here; finished ones stay cached
                if status == "busy":
                    retry.append(i)
                    continue
                if status == "built":
                    stats["built"] += 1
                    stats["bytes"] += shards[i].size
                    stats["tokens"] += meta.get("tokens", 0)
                    stats["shard_seconds"].append(meta.get("seconds", 0.0))
                    stats["worker_rss_mib"].append(meta.get("peak_rss_mib", 0.0))
                    stats["shard_cpu_seconds"].append(meta.get("cpu_seconds", 0.0))
                if bar is not None:
                    bar.update(shards[i].size)
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    finally:
        if bar is not None:
            bar.close()
    pool.shutdown(wait=True)
    stats["seconds"] = time.perf_counter() - t0
    return stats
