"""launch/slurm.sbatch on a real one-node SLURM cluster (munged + slurmctld + slurmd on localhost): a job trains
with 2 processes through torchrun; a job warned with USR1 checkpoints, requeues itself and finishes from its
checkpoint; srun one-task-per-process mode finds its ranks and rank 0's address from SLURM's variables."""
import json
import sys
import time

import pytest

from tests.launch.slurm_cluster import LocalSlurm, missing
from tests.train.conftest import ROOT, SMALL, child_env, read_metrics, train_losses

pytestmark = pytest.mark.skipif(missing() is not None, reason=str(missing()))
SCRIPT = ROOT / "launch" / "slurm.sbatch"


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    cluster = LocalSlurm(tmp_path_factory.mktemp("slurm"))
    try:
        yield cluster.start()
    finally:
        cluster.stop()


def job_env(cluster, cache_dir) -> dict:
    env = child_env(cache_dir)
    env.update(SLURM_CONF=str(cluster.conf), PYTHON=sys.executable, NPROC_PER_NODE="2")
    return env


def sbatch(cluster, cache_dir, tmp_path, *args) -> str:
    cmd = ["sbatch", "--parsable", f"--output={tmp_path}/batch-%j.out", str(SCRIPT), "recipes/tiny.yaml",
           *SMALL, *args]
    return cluster.run(cmd, cwd=ROOT, env=job_env(cluster, cache_dir)).stdout.strip().split(";")[0]


def batch_output(tmp_path, job_id) -> str:
    """The batch script's output plus every per-node training log of the job (what a failure needs)."""
    path = tmp_path / f"batch-{job_id}.out"
    text = path.read_text() if path.is_file() else ""
    for log in sorted(tmp_path.glob(f"**/logs/slurm-{job_id}-node*.log")):
        text += f"\n--- {log.name}\n" + log.read_text()[-4000:]
    return text


def test_sbatch_trains_with_two_processes(slurm, cache_dir, tmp_path):
    run = tmp_path / "run"
    job_id = sbatch(slurm, cache_dir, tmp_path, f"run.dir={run}", "train.steps=4")
    info = slurm.wait_for(job_id, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), timeout=240)
    assert info["JobState"] == "COMPLETED", batch_output(tmp_path, job_id) + slurm.logs()
    assert read_metrics(run)[0]["world_size"] == 2
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-4"
    log = (run / "logs" / f"slurm-{job_id}-node0.log").read_text()
    assert "saved" in log and "rendezvous" in batch_output(tmp_path, job_id)


@pytest.mark.slow  # ~40 s (a requeue waits out SLURM's job hold); passed in -m slow runs of the file and of tests/launch
def test_usr1_checkpoints_requeues_and_resumes(slurm, cache_dir, tmp_path):
    run = tmp_path / "run"
    steps = 60
    job_id = sbatch(slurm, cache_dir, tmp_path, f"run.dir={run}", f"train.steps={steps}", "data.seq_len=128",
                    "checkpoint.interval=0")
    deadline = time.time() + 180
    while not (run / "metrics.jsonl").is_file() or max(train_losses(run) or [0]) < 3:
        assert time.time() < deadline, batch_output(tmp_path, job_id) + slurm.logs()
        time.sleep(0.5)
    # What `#SBATCH --signal=B:USR1@120` does before the time limit: USR1 to the batch script only.
    slurm.run(["scancel", "--batch", "--signal=USR1", job_id])
    # SLURM holds a requeued job for about two minutes (BeginTime); an administrator may start it at once.
    slurm.wait_for(job_id, ("PENDING",), timeout=120)
    slurm.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"])
    info = slurm.wait_for(job_id, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), timeout=300)
    out = batch_output(tmp_path, job_id)
    assert info["JobState"] == "COMPLETED", out + slurm.logs()
    assert int(info["Restarts"]) == 1
    assert "requeueing job" in out
    log = (run / "logs" / f"slurm-{job_id}-node0.log").read_text()
    assert "stopped (signal 10)" in log and "resumed from" in log
    assert sorted(train_losses(run)) == list(range(1, steps + 1))  # every step once, across the two runs
    state = json.loads((run / "checkpoints" / f"step-{steps}" / "trainer.json").read_text())
    assert state["step"] == steps


def test_srun_one_task_per_process(slurm, cache_dir, tmp_path):
    """`srun -n 2 python -m lctrain`: ranks from SLURM_PROCID/SLURM_NTASKS, MASTER_ADDR from the node list."""
    run = tmp_path / "run"
    env = job_env(slurm, cache_dir)
    cmd = ["srun", "-n", "2", "--overcommit", sys.executable, "-m", "lctrain", "recipes/tiny.yaml", f"run.dir={run}",
           *SMALL, "train.steps=3"]
    proc = slurm.run(cmd, check=False, cwd=ROOT, env=env, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert read_metrics(run)[0]["world_size"] == 2
    assert (run / "checkpoints" / "step-3" / "rank-1.pt").is_file()


def test_bad_recipe_fails_fast_with_exit_code_2(slurm, cache_dir, tmp_path):
    job_id = sbatch(slurm, cache_dir, tmp_path, "train.stepz=3")
    info = slurm.wait_for(job_id, ("COMPLETED", "FAILED", "CANCELLED"), timeout=120)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0"
    assert "error: train.stepz: unknown key" in batch_output(tmp_path, job_id)
