"""Process-group set-up: rank discovery from torchrun, SLURM (one task per process) or MPI (Open MPI variables,
or mpi4py); rank 0's address from `lctrain.train.rendezvous`."""
from __future__ import annotations

import datetime
import gc
import importlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str = "gloo"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def discover_ranks(environ=os.environ) -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from the launcher's environment; (0, 1, 0) when launched plainly."""
    for rank_key, size_key, local_key in (
        ("RANK", "WORLD_SIZE", "LOCAL_RANK"),  # torchrun, deepspeed launcher
        ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),  # mpirun (Open MPI)
        ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"),  # MPICH / Intel MPI
        ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"),  # srun, one task per process
    ):
        if rank_key in environ and size_key in environ:
            return int(environ[rank_key]), int(environ[size_key]), int(environ.get(local_key, 0))
    from lctrain.train.rendezvous import mpi_ranks
    return mpi_ranks(environ) or (0, 1, 0)


def init_distributed(backend: str = "auto", timeout_s: float = 600.0) -> DistEnv:
    """Initialise torch.distributed when the world has more than one process; pick the device for this rank.
    `timeout_s` (parallel.timeout_s) bounds every collective of the default group and of the groups made later."""
    rank, world, local = discover_ranks()
    use_cuda = torch.cuda.is_available()
    device = torch.device("cuda", local % max(torch.cuda.device_count(), 1)) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    chosen = backend if backend != "auto" else ("nccl" if use_cuda else "gloo")
    if chosen == "nccl" and not use_cuda:
        raise RuntimeError("parallel.backend='nccl' needs CUDA devices; use 'gloo' or 'auto' on CPU")
    if world > 1 and not dist.is_initialized():
        from lctrain.train.rendezvous import agree_on_master
        agree_on_master()  # mpirun / srun leave MASTER_ADDR and MASTER_PORT to us
        os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"] = str(rank), str(world), str(local)
        # Imported after the group exists, torch._dynamo (DDP imports it) keeps references to the default group
        # that nothing releases: destroy_process_group then leaves gloo's worker threads running into interpreter
        # exit, where a worker that frees a Python-owned tensor aborts the process (SIGABRT after a finished run).
        importlib.import_module("torch._dynamo")
        dist.init_process_group(chosen, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s),
                                device_id=device if use_cuda and chosen == "nccl" else None)
    return DistEnv(rank=rank, world_size=world, local_rank=local, device=device, backend=chosen)


def all_reduce_sum(value: torch.Tensor, env: DistEnv, group=None) -> torch.Tensor:
    if env.distributed:
        dist.all_reduce(value, op=dist.ReduceOp.SUM, group=group)
    return value


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def shutdown(env: DistEnv, together: bool = True) -> None:
    """Tear the process group down. On a normal exit the ranks do it together: a rank that destroys its group
    while a peer still talks to it can abort the peer at exit (gloo). After an error a peer may never arrive,
    so then each rank leaves on its own (`together=False`)."""
    if env.distributed and dist.is_initialized():
        if together:
            dist.barrier()
        gc.collect()  # a module or optimizer in a reference cycle holds the group and its gloo workers alive
        dist.destroy_process_group()
