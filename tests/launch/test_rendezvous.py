"""Rank 0's address when the launcher leaves it to lctrain (srun one task per process, mpirun)."""
import sys

import pytest

from lctrain.train.dist import discover_ranks
from lctrain.train.rendezvous import agree_on_master, parse_first_host


@pytest.mark.parametrize("nodelist, first", [
    ("node7", "node7"), ("gpu[03-05,9],cpu1", "gpu03"), ("a-1,b-2", "a-1"), ("rack[1-2]-n[01-04]", "rack1"),
])
def test_first_host_of_a_slurm_node_list(nodelist, first):
    assert parse_first_host(nodelist) == first


def test_srun_tasks_agree_without_talking():
    env = {"SLURM_PROCID": "3", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "123456",
           "SLURM_JOB_NODELIST": "n1"}
    assert discover_ranks(env) == (3, 8, 1)
    agree_on_master(env)
    assert env["MASTER_ADDR"] == "n1" and env["MASTER_PORT"] == str(20000 + 123456 % 20000)


def test_launcher_values_are_kept():
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "n1", "MASTER_ADDR": "h",
           "MASTER_PORT": "1"}
    agree_on_master(env)
    assert (env["MASTER_ADDR"], env["MASTER_PORT"]) == ("h", "1")


def test_multi_node_mpirun_without_mpi4py_says_what_to_do(monkeypatch):
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # as if it were not installed
    env = {"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "16", "OMPI_COMM_WORLD_LOCAL_SIZE": "8"}
    with pytest.raises(RuntimeError, match="needs mpi4py .* or MASTER_ADDR exported"):
        agree_on_master(env)
    single = {"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}
    agree_on_master(single)
    assert single["MASTER_ADDR"] == "127.0.0.1" and single["MASTER_PORT"] == "29500"
