"""Process groups for data parallel x sequence parallel training.

The world of `W = DP * SP` ranks is split into DP groups of SP *contiguous* ranks: ranks
`[d*SP, (d+1)*SP)` form SP group `d` and all see the same packed sample. DP group `s` holds the ranks with the
same SP rank `s` (`s, SP + s, 2*SP + s, ...`). Contiguous SP groups keep the chatty sequence-parallel traffic
inside one node when SP <= GPUs per node.
"""
from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist


@dataclass(frozen=True)
class SPGroups:
    """Where this rank sits in the DP x SP grid.

    sp_group / dp_group are `torch.distributed` process groups, or None when that dimension has one rank (or when
    torch.distributed is not initialised: everything then runs single-process).
    """
    world_size: int
    rank: int
    sp_size: int
    sp_rank: int
    dp_size: int
    dp_rank: int
    sp_group: Any = None
    dp_group: Any = None

    @property
    def distributed(self) -> bool:
        """True when torch.distributed is initialised and the world has more than one rank."""
        return self.world_size > 1

    def sp_global_rank(self, sp_rank: int) -> int:
        """Global rank of member `sp_rank` of this rank's SP group."""
        return self.dp_rank * self.sp_size + sp_rank


def single_process_groups() -> SPGroups:
    """The trivial grid: one rank, no communication."""
    return SPGroups(world_size=1, rank=0, sp_size=1, sp_rank=0, dp_size=1, dp_rank=0)


def init_sp_groups(sp: int, timeout: datetime.timedelta | None = None) -> SPGroups:
    """Build the DP x SP grid with SP groups of `sp` contiguous ranks.

    Works without torch.distributed initialised (then `sp` must be 1). Every rank must call this (new_group is
    collective), in the same order. `timeout` bounds the groups' collectives (parallel.timeout_s); torch would
    otherwise give new groups its 30-minute default, not the default group's timeout.
    """
    if not isinstance(sp, int) or isinstance(sp, bool) or sp < 1:
        raise ValueError(f"init_sp_groups: sp must be a positive int, got {sp!r}")
    if not (dist.is_available() and dist.is_initialized()):
        if sp != 1:
            raise ValueError(
                f"init_sp_groups: sp={sp} needs torch.distributed initialised with a world size divisible by {sp}; "
                "it is not initialised (single process allows only sp=1)")
        return single_process_groups()
    world, rank = dist.get_world_size(), dist.get_rank()
    if world % sp != 0:
        raise ValueError(f"init_sp_groups: world size {world} is not divisible by sp={sp}")
    dp = world // sp
    sp_group = dp_group = None
    # new_group is collective over the whole world: every rank creates every group, keeps its own.
    for d in range(dp):
        members = list(range(d * sp, (d + 1) * sp))
        group = dist.new_group(members, timeout=timeout) if sp > 1 else None
        if rank in members:
            sp_group = group
    for s in range(sp):
        members = list(range(s, world, sp))
        group = dist.new_group(members, timeout=timeout) if dp > 1 else None
        if rank in members:
            dp_group = group
    return SPGroups(world_size=world, rank=rank, sp_size=sp, sp_rank=rank % sp, dp_size=dp, dp_rank=rank // sp,
                    sp_group=sp_group, dp_group=dp_group)
