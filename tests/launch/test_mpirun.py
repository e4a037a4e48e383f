"""`mpirun -np 2 python -m lctrain ...` (Open MPI): ranks from OMPI_COMM_WORLD_*, rank 0's address over mpi4py
(or the single-node default), and the same losses as torchrun's 2-process run."""
import shutil
import subprocess
import sys

import pytest

from tests.train.conftest import ROOT, SMALL, child_env, free_port, run_lctrain, train_losses

pytestmark = pytest.mark.skipif(shutil.which("mpirun") is None,
                                reason="mpirun not installed (Debian: apt-get install openmpi-bin)")

STEPS = ["train.steps=4", "train.tokens_per_step=1024", "data.max_documents=12", "checkpoint.interval=2"]


def test_mpirun_matches_torchrun(cache_dir, tmp_path):
    reference = tmp_path / "torchrun"
    run_lctrain(cache_dir, reference, *STEPS, nproc=2)
    run = tmp_path / "mpirun"
    env = child_env(cache_dir)
    env["MASTER_PORT"] = str(free_port())  # leave MASTER_ADDR to lctrain (mpi4py broadcast or 127.0.0.1)
    cmd = ["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", "2", sys.executable, "-m", "lctrain",
           "recipes/tiny.yaml", f"run.dir={run}", *SMALL, *STEPS]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "world: 2 = dp 2 x sp 1" in proc.stdout
    assert train_losses(run) == train_losses(reference)  # exact: same data, same reductions
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-4"
    assert (run / "checkpoints" / "step-4" / "rank-1.pt").is_file()
