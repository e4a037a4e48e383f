"""Every sequence-parallel collective goes through here, so its traffic is counted per layer type.

Bytes are counted per rank as *bytes this rank sends to other ranks plus bytes it receives from them*, by the
logical volume of the collective (what any bandwidth-optimal algorithm must move), never its own shard:

    all_gather of x (W ranks)       2 (W-1) |x|
    reduce_scatter of x = [W, ...]  2 (W-1) |x| / W
    all_to_all of x = [W, ...]      2 (W-1) |x| / W
    send / receive                  |sent| + |received|
    all_reduce of x                 4 (W-1) |x| / W   (reduce-scatter + all-gather)

`comm_stats()` returns and resets `{"comm_bytes_<kind>": int, "comm_calls_<kind>": int}` for every kind seen and
always for `linear`, `attn` and `conv`. With one rank nothing is sent and nothing is counted.
"""
from __future__ import annotations

from collections import defaultdict

import torch
import torch.distributed as dist

from lctrain.parallel.groups import SPGroups

ALWAYS_REPORTED = ("linear", "attn", "conv")

_bytes: dict[str, int] = defaultdict(int)
_calls: dict[str, int] = defaultdict(int)

# torch >= 2.10 renamed the tensor collectives; keep working on older releases.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _count(kind: str, nbytes: int) -> None:
    if not isinstance(kind, str) or not kind.isidentifier():
        raise ValueError(f"comm: kind must be a layer-type name such as {ALWAYS_REPORTED}, got {kind!r}")
    _bytes[kind] += int(nbytes)
    _calls[kind] += 1


def comm_stats(reset: bool = True) -> dict[str, int]:
    """Bytes sent + received and number of collectives per layer type since the last reset."""
    kinds = sorted(set(ALWAYS_REPORTED) | set(_bytes))
    stats = {f"comm_bytes_{k}": int(_bytes.get(k, 0)) for k in kinds}
    stats.update({f"comm_calls_{k}": int(_calls.get(k, 0)) for k in kinds})
    if reset:
        _bytes.clear()
        _calls.clear()
    return stats


def _nbytes(x: torch.Tensor) -> int:
    return x.numel() * x.element_size()


def all_gather(x: torch.Tensor, groups: SPGroups, kind: str) -> torch.Tensor:
    """`x [*S]` from every SP rank -> `[W, *S]`, row i from SP rank i."""
    world = groups.sp_size
    if world == 1:
        return x.unsqueeze(0)
    flat = x.contiguous().reshape(-1)
    # gloo needs one output tensor concatenated along dim 0, not a list.
    out = flat.new_empty(world * flat.numel())
    _all_gather_single(out, flat, group=groups.sp_group)
    _count(kind, 2 * (world - 1) * _nbytes(x))
    return out.view((world,) + tuple(x.shape))


class PendingGather:
    """An all_gather in flight: `wait()` returns `[W, *S]`."""

    def __init__(self, out: torch.Tensor, shape: tuple, request):
        self.out, self.shape, self.request = out, shape, request

    def wait(self) -> torch.Tensor:
        if self.request is not None:
            self.request.wait()
        return self.out.view(self.shape)


def all_gather_async(x: torch.Tensor, groups: SPGroups, kind: str) -> PendingGather:
    """Start `all_gather` and return at once, so local work can run while the summaries travel."""
    world = groups.sp_size
    shape = (world,) + tuple(x.shape)
    if world == 1:
        return PendingGather(x.reshape(-1).clone(), shape, None)
    flat = x.contiguous().reshape(-1)
    out = flat.new_empty(world * flat.numel())
    request = _all_gather_single(out, flat, group=groups.sp_group, async_op=True)
    _count(kind, 2 * (world - 1) * _nbytes(x))
    return PendingGather(out, shape, request)


def reduce_scatter(x: torch.Tensor, groups: SPGroups, kind: str) -> torch.Tensor:
    """`x [W, *S]` on every SP rank -> `[*S]`: the sum over ranks of row `sp_rank`."""
    world = groups.sp_size
    if x.shape[0] != world:
        raise ValueError(f"comm.reduce_scatter: leading dim must be the SP size {world}, got {tuple(x.shape)}")
    if world == 1:
        return x[0]
    flat = x.contiguous().reshape(-1)
    out = flat.new_empty(flat.numel() // world)
    _reduce_scatter_single(out, flat, group=groups.sp_group)
    _count(kind, 2 * (world - 1) * _nbytes(out))
    return out.view(tuple(x.shape[1:]))


def all_to_all(x: torch.Tensor, groups: SPGroups, kind: str) -> torch.Tensor:
    """`x [W, *S]`: row j goes to SP rank j; returns `[W, *S]` whose row i came from SP rank i."""
    world = groups.sp_size
    if x.shape[0] != world:
        raise ValueError(f"comm.all_to_all: leading dim must be the SP size {world}, got {tuple(x.shape)}")
    if world == 1:
        return x.clone()
    flat = x.contiguous().reshape(-1)
    out = torch.empty_like(flat)
    dist.all_to_all_single(out, flat, group=groups.sp_group)
    _count(kind, 2 * (world - 1) * _nbytes(x[0]))
    return out.view(x.shape)


def exchange(sends: list[tuple[torch.Tensor, int]], recvs: list[tuple[torch.Tensor, int]], groups: SPGroups,
             kind: str) -> None:
    """Point-to-point: send each `(tensor, dst_sp_rank)`, receive into each `(buffer, src_sp_rank)` in place.

    All operations are posted together (batch_isend_irecv), so a ring of sends cannot deadlock. The peers must
    post the matching operations in the same order.
    """
    if not sends and not recvs:
        return
    ops = []
    for tensor, dst in sends:
        ops.append(dist.P2POp(dist.isend, tensor.contiguous(), groups.sp_global_rank(dst), groups.sp_group))
    for buffer, src in recvs:
        if not buffer.is_contiguous():
            raise ValueError("comm.exchange: receive buffers must be contiguous")
        ops.append(dist.P2POp(dist.irecv, buffer, groups.sp_global_rank(src), groups.sp_group))
    for request in dist.batch_isend_irecv(ops):
        request.wait()
    _count(kind, sum(_nbytes(t) for t, _ in sends) + sum(_nbytes(b) for b, _ in recvs))


def ring_shift(x: torch.Tensor, groups: SPGroups, kind: str) -> torch.Tensor:
    """Send `x` to SP rank `r+1` and return the tensor received from SP rank `r-1` (cyclically)."""
    world = groups.sp_size
    if world == 1:
        return x
    received = torch.empty_like(x, memory_format=torch.contiguous_format)
    r = groups.sp_rank
    exchange([(x, (r + 1) % world)], [(received, (r - 1) % world)], groups, kind)
    return received


class PendingShift:
    """A ring hop in flight: `wait()` returns the tensor received from SP rank r-1."""

    def __init__(self, received: torch.Tensor, requests: list):
        self.received = received
        self.requests = requests

    def wait(self) -> torch.Tensor:
        for request in self.requests:
            request.wait()
        return self.received


def ring_shift_async(x: torch.Tensor, groups: SPGroups, kind: str) -> PendingShift:
    """Post the send of `x` to SP rank r+1 and the receive from r-1 without waiting, so the caller can compute
    on the block it holds while the next one travels (ring attention's overlap)."""
    world = groups.sp_size
    if world == 1:
        return PendingShift(x, [])
    x = x.contiguous()
    received = torch.empty_like(x)
    r = groups.sp_rank
    ops = [dist.P2POp(dist.isend, x, groups.sp_global_rank((r + 1) % world), groups.sp_group),
           dist.P2POp(dist.irecv, received, groups.sp_global_rank((r - 1) % world), groups.sp_group)]
    requests = dist.batch_isend_irecv(ops)
    _count(kind, 2 * _nbytes(x))
    return PendingShift(received, requests)


def all_reduce_world(x: torch.Tensor, groups: SPGroups, kind: str) -> torch.Tensor:
    """Sum `x` over every rank of the world (DP x SP); returns a new tensor."""
    out = x.clone()
    if groups.world_size == 1:
        return out
    dist.all_reduce(out)
    _count(kind, 4 * (groups.world_size - 1) * _nbytes(out) // groups.world_size)
    return out
