"""Where rank 0 listens (MASTER_ADDR / MASTER_PORT) when the launcher does not say.

torchrun and the deepspeed launcher set both. The others do not:
- `srun python -m lctrain ...` (one task per process): the first host of the job's node list, and a port derived
  from the job id, so every task computes the same pair without talking to the others.
- `mpirun -np N python -m lctrain ...`: with mpi4py, rank 0 broadcasts its host name and a free port over MPI;
  without it, a single-node job uses 127.0.0.1 and MASTER_PORT (default 29500) — a multi-node job without mpi4py
  must export MASTER_ADDR itself (`mpirun -x MASTER_ADDR=<first host> ...`).
"""
from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess

DEFAULT_PORT = 29500


def first_slurm_host(nodelist: str) -> str:
    """The first host of a SLURM node list (scontrol's answer when scontrol is here, else parsed)."""
    if shutil.which("scontrol"):
        try:
            out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                                 timeout=30, check=True).stdout.split()
            if out:
                return out[0]
        except (subprocess.SubprocessError, OSError):
            pass
    return parse_first_host(nodelist)


def parse_first_host(nodelist: str) -> str:
    """`gpu[03-05,9],cpu1` -> `gpu03`: the first name of a SLURM host list, zero padding kept."""
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not match:
        raise RuntimeError(f"cannot read the first host of SLURM_JOB_NODELIST={nodelist!r}; export MASTER_ADDR")
    prefix, ranges = match.groups()
    if not ranges:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _under_mpi(environ) -> bool:
    return any(k in environ for k in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK"))


def mpi_ranks(environ=os.environ) -> tuple[int, int, int] | None:
    """(rank, world, local rank) from mpi4py for MPI launches whose variables discover_ranks does not know
    (PMIx-only launchers); None when not under MPI or without mpi4py."""
    if not _under_mpi(environ):
        return None
    try:
        from mpi4py import MPI
    except ImportError:
        return None
    comm = MPI.COMM_WORLD
    local = comm.Split_type(MPI.COMM_TYPE_SHARED).Get_rank()  # ranks on the same node
    return comm.Get_rank(), comm.Get_size(), local


def _mpi_broadcast() -> tuple[str, int] | None:
    """(host, port) chosen by MPI rank 0 and broadcast to all ranks; None without mpi4py."""
    try:
        from mpi4py import MPI
    except ImportError:
        return None
    comm = MPI.COMM_WORLD
    mine = None
    if comm.Get_rank() == 0:
        mine = (socket.gethostname(), int(os.environ.get("MASTER_PORT") or _free_port()))
    return comm.bcast(mine, root=0)


def agree_on_master(environ=os.environ) -> None:
    """Set MASTER_ADDR / MASTER_PORT in `environ` when the launcher left them unset."""
    if environ.get("MASTER_ADDR") and environ.get("MASTER_PORT"):
        return
    nodelist = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST")
    if "SLURM_PROCID" in environ and nodelist and "RANK" not in environ:
        environ.setdefault("MASTER_ADDR", first_slurm_host(nodelist))
        environ.setdefault("MASTER_PORT", str(20000 + int(environ.get("SLURM_JOB_ID", "0")) % 20000))
        return
    if _under_mpi(environ) and not environ.get("MASTER_ADDR"):
        chosen = _mpi_broadcast()
        if chosen is not None:
            environ["MASTER_ADDR"], environ["MASTER_PORT"] = chosen[0], str(chosen[1])
            return
        local, world = environ.get("OMPI_COMM_WORLD_LOCAL_SIZE"), environ.get("OMPI_COMM_WORLD_SIZE")
        if local is not None and world is not None and local != world:
            raise RuntimeError("mpirun across several nodes needs mpi4py (pip install 'lctrain[mpi]') or "
                               "MASTER_ADDR exported to every rank (mpirun -x MASTER_ADDR=<first host>)")
    environ.setdefault("MASTER_ADDR", "127.0.0.1")
    environ.setdefault("MASTER_PORT", str(DEFAULT_PORT))
