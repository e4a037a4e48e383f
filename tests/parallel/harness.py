"""Run many distributed test cases inside one spawn of W gloo processes.

A case is a function `case(groups)` (groups = `init_sp_groups(W)`) registered in a `cases_*.py` module's `CASES`
dict; it raises AssertionError on a mismatch. Every rank runs every case in the same order (collectives must
match), records "ok" or the traceback, and the parent process collects the per-rank reports.
"""
from __future__ import annotations

import datetime
import hashlib
import importlib
import json
import os
import tempfile
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def port_for(tag: str) -> int:
    """A deterministic port per tag (hashlib, not hash(): stable across runs and processes)."""
    return 20000 + int(hashlib.sha256(tag.encode()).hexdigest(), 16) % 30000


def _worker(rank: int, world: int, port: int, out_dir: str, modules: list[str]) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    from lctrain.parallel import comm, init_sp_groups
    groups = init_sp_groups(world)
    report = {}
    for module_name in modules:
        module = importlib.import_module(module_name)
        for name, case in module.CASES.items():
            torch.manual_seed(1234)        # identical inputs on every rank
            comm.comm_stats(reset=True)
            try:
                case(groups)
                report[f"{module_name}:{name}"] = "ok"
            except Exception:  # noqa: BLE001 - the report carries the traceback to the parent
                report[f"{module_name}:{name}"] = traceback.format_exc()
    dist.barrier()
    dist.destroy_process_group()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(report, f)


def run_cases(world: int, modules: list[str], tag: str) -> dict[str, list[str]]:
    """Spawn `world` processes running every case of `modules`; return {"module:case": [report per rank]}."""
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_worker, args=(world, port_for(f"{tag}-{world}"), out_dir, modules), nprocs=world, join=True)
        reports = []
        for rank in range(world):
            with open(os.path.join(out_dir, f"rank{rank}.json")) as f:
                reports.append(json.load(f))
    return {key: [r.get(key, "missing") for r in reports] for key in reports[0]}


def assert_case(sp_report, world: int, module: str, case: str) -> None:
    """Fail with every rank's traceback unless all ranks reported "ok"."""
    reports = sp_report(world, module, case)
    failures = [f"rank {rank}:\n{msg}" for rank, msg in enumerate(reports) if msg != "ok"]
    assert not failures, "\n".join(failures)
