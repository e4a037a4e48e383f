"""How a run ends: a finished distributed run leaves no gloo worker behind, and the process exit never
finalizes the interpreter under a live gloo worker.

A gloo worker that outlives `destroy_process_group` can free a Python-owned tensor while the interpreter is
shutting down, which aborts the process (SIGABRT, exit 134) after a run that trained and saved correctly.
"""
import json
import os
import subprocess
import sys

import pytest
import torch.multiprocessing as mp

from lctrain.process_exit import gloo_workers
from tests.parallel.harness import port_for
from tests.train.conftest import ROOT, SMALL

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="needs /proc (Linux) to list threads")


def _worker(rank: int, world: int, port: int, run_dir: str, cache_dir: str, out_dir: str, extra: list) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), LCTRAIN_CACHE=cache_dir, OMP_NUM_THREADS="1")
    assert "torch._dynamo" not in sys.modules  # the case that leaked: DDP imports it after the group exists
    from lctrain.cli_args import find_recipe
    from lctrain.config import load_config
    from lctrain.train.loop import train
    cfg = load_config(find_recipe("tiny"), [f"run.dir={run_dir}", *SMALL, "train.steps=2",
                                            "train.tokens_per_step=512", "data.max_documents=12",
                                            "checkpoint.interval=0", "logging.tensorboard=false", *extra])
    code = train(cfg)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"code": code, "gloo": gloo_workers()}, f)


@pytest.mark.parametrize("extra", [[], pytest.param(["parallel.sp=2"], marks=pytest.mark.slow)], ids=["ddp", "sp2"])
def test_a_finished_run_joins_the_gloo_workers(cache_dir, tmp_path, extra):
    mp.spawn(_worker, args=(2, port_for(f"shutdown-{extra}"), str(tmp_path / "run"), str(cache_dir), str(tmp_path),
                            extra), nprocs=2, join=True)
    for rank in range(2):
        report = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert report["code"] == 0
        assert report["gloo"] == []


SEEN = """
import torch.distributed as dist
from lctrain.process_exit import gloo_workers
before = gloo_workers()
dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
during = gloo_workers()
dist.destroy_process_group()
print(before, any(name.startswith("pt_gloo") for name in during), gloo_workers())
"""


def test_gloo_workers_are_seen_while_a_group_lives():
    proc = subprocess.run([sys.executable, "-c", SEEN], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == "[] True []", proc.stderr


LEAVE = """
import atexit, sys
import torch.distributed as dist
from lctrain.process_exit import leave
atexit.register(lambda: print("finalized", flush=True))
if sys.argv[1] == "alive":
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)  # never destroyed
print("trained")
if sys.argv[2:] == ["closed"]:
    sys.stdout.close()  # e.g. the reader of a pipe went away
leave(3)
"""


@pytest.mark.parametrize("group", ["alive", "none"])
def test_leave_skips_finalization_only_under_live_gloo_workers(group):
    proc = subprocess.run([sys.executable, "-c", LEAVE, group], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout.startswith("trained\n")  # buffered output still reaches the pipe
    assert ("finalized" in proc.stdout) == (group == "none")


def test_leave_with_a_closed_stdout_still_exits_with_the_code():
    proc = subprocess.run([sys.executable, "-c", LEAVE, "alive", "closed"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 3 and "Traceback" not in proc.stderr, proc.stderr
