"""LASP-2: sequence parallelism for the linear-attention family with one AllGather of state summaries.

A chunk of a recurrent op maps the state entering it to the state leaving it by an affine map

    S_out = A S_in + B          (S: [H, K, V]; B = the chunk's final state from a zero start)

with A = exp(sum of log-decays) per head for linear attention (a scalar), and for the gated delta rule the
product of `exp(g_t) (I - beta_t k_t k_t^T)` (a K x K matrix per head). A chunk that contains a document start
forgets everything before it: A = 0. Every rank summarises its chunks (in closed form for linear attention, with
one extra op call for the delta rule), AllGathers the summaries, composes the prefix in global chunk order to
get the state entering each of its chunks, and runs the op once from those states (packed segments with
per-segment `initial_state`: zigzag chunks and documents starting inside a shard are separate segments).
Backward mirrors it with one AllGather of the gradients w.r.t. the entering states (suffix composition).
Traffic per layer is independent of the sequence length.

The recurrent op itself is a plain function with the kernel contract (`lctrain.kernels`), so any op with that
contract plugs in through `op=`; the op's own autograd gives the local gradients.
"""
from __future__ import annotations

from typing import Callable

import torch

from lctrain.parallel import comm
from lctrain.parallel.sharding import SPPlacement

KIND = "linear"


# ----------------------------------------------------------------------------------------------- segmentation
def _segments(placement: SPPlacement, cu_seqlens: torch.Tensor | None, rows: int, local_len: int):
    """Cut the flattened local tokens `[rows * local_len]` at every document start and every chunk start.

    Returns `(cu, first_seg, last_seg, has_start, doc_start)`: int32 offsets `[N+1]`, the first and last segment
    index of each local chunk `[rows, n_local]`, whether a document starts anywhere inside the chunk, and the
    per-token document starts `[rows, n_local, c]`.
    """
    c = placement.chunk_size
    n_local = len(placement.chunk_ids)
    device = placement.position_ids.device
    doc_start = (placement.position_ids == 0).reshape(-1).clone()
    chunk_start = torch.zeros(rows * local_len, dtype=torch.bool, device=device)
    chunk_start[::c] = True
    if cu_seqlens is not None:
        offsets = cu_seqlens.to(device=device, dtype=torch.long)
        if offsets.dim() != 1 or int(offsets[0]) != 0 or int(offsets[-1]) != rows * local_len:
            raise ValueError(f"sp linear op: cu_seqlens must be 1-D offsets from 0 to {rows * local_len} over the "
                             f"local tokens, got {cu_seqlens.tolist()}")
        inner = torch.zeros_like(doc_start)
        inner[offsets[:-1]] = True
        # at chunk starts the placement, not the local offsets, knows whether a document continues
        doc_start |= inner & ~chunk_start
    starts = doc_start | chunk_start
    seg_id = torch.cumsum(starts.long(), 0) - 1
    first_tok = torch.arange(rows * n_local, device=device) * c
    first_seg = seg_id[first_tok].reshape(rows, n_local)
    last_seg = seg_id[first_tok + c - 1].reshape(rows, n_local)
    has_start = doc_start.reshape(rows * n_local, c).any(dim=1).reshape(rows, n_local)
    idx = torch.nonzero(starts).flatten()
    cu = torch.cat([idx, idx.new_tensor([rows * local_len])]).to(torch.int32)
    return cu, first_seg, last_seg, has_start, doc_start.reshape(rows, n_local, c)


# ------------------------------------------------------------------------------------- prefix composition
def _apply(a: torch.Tensor, state: torch.Tensor, matrix: bool, transpose: bool = False) -> torch.Tensor:
    """A applied to a state `[..., H, K, V]`; a is `[..., H]` (scalar per head) or `[..., H, K, K]`."""
    if not matrix:
        return a[..., None, None] * state
    return (a.transpose(-1, -2) if transpose else a) @ state


class _EnteringStates(torch.autograd.Function):
    """Summaries of the local chunks -> state entering each local chunk (one AllGather each way)."""

    @staticmethod
    def forward(ctx, a_local, b_local, gathered, placement: SPPlacement, matrix: bool):
        # a_local [R, n, H] or [R, n, H, K, K]; b_local [R, n, H, K, V]; gathered [W, R, n, P]: every rank's
        # packed (A, B), already all-gathered by `start_gather` (so the caller can overlap work with it)
        rows = b_local.shape[0]
        a_size = a_local[0, 0].numel()
        order = _global_order(placement)
        a_all = _to_global(gathered[..., :a_size], order).reshape((rows, -1) + tuple(a_local.shape[2:]))
        b_all = _to_global(gathered[..., a_size:], order).reshape((rows, -1) + tuple(b_local.shape[2:]))
        entering = torch.zeros_like(b_all)
        for j in range(b_all.shape[1] - 1):
            entering[:, j + 1] = _apply(a_all[:, j], entering[:, j], matrix) + b_all[:, j]
        ctx.save_for_backward(a_all, entering)
        ctx.placement, ctx.matrix, ctx.a_shape = placement, matrix, a_local.shape
        return entering[:, list(placement.chunk_ids)]

    @staticmethod
    def backward(ctx, grad_local):
        a_all, entering = ctx.saved_tensors
        placement, matrix = ctx.placement, ctx.matrix
        rows, n_local = grad_local.shape[:2]
        gathered = comm.all_gather(grad_local.contiguous().reshape(rows, n_local, -1), placement.groups, KIND)
        direct = _to_global(gathered, _global_order(placement)).reshape(entering.shape)
        # total gradient w.r.t. E_j: G_j = dE_j + A_j^T G_{j+1}, since E_{j+1} = A_j E_j + B_j
        total = torch.zeros_like(direct)
        total[:, -1] = direct[:, -1]
        for j in range(direct.shape[1] - 2, -1, -1):
            total[:, j] = direct[:, j] + _apply(a_all[:, j], total[:, j + 1], matrix, transpose=True)
        grad_b = torch.zeros_like(direct)
        grad_b[:, :-1] = total[:, 1:]
        if matrix:
            grad_a = torch.zeros_like(a_all)
            grad_a[:, :-1] = total[:, 1:] @ entering[:, :-1].transpose(-1, -2)
        else:
            grad_a = torch.zeros_like(a_all)
            grad_a[:, :-1] = (total[:, 1:] * entering[:, :-1]).sum(dim=(-1, -2))
        local = list(placement.chunk_ids)
        return grad_a[:, local], grad_b[:, local], None, None, None


def start_gather(a_local: torch.Tensor, b_local: torch.Tensor, placement: SPPlacement) -> comm.PendingGather:
    """Post the one forward AllGather of the local (A, B) summaries; `_EnteringStates` consumes the result."""
    rows, n_local = b_local.shape[:2]
    packed = torch.cat([a_local.detach().reshape(rows, n_local, -1), b_local.detach().reshape(rows, n_local, -1)],
                       dim=-1)
    return comm.all_gather_async(packed, placement.groups, KIND)


def _global_order(placement: SPPlacement) -> list[tuple[int, int]]:
    """For each global chunk in order: (SP rank, local index) holding it."""
    owner = {}
    for rank in range(placement.sp_size):
        for local, chunk in enumerate(placement.chunk_ids_of(rank)):
            owner[chunk] = (rank, local)
    return [owner[j] for j in range(placement.num_chunks)]


def _to_global(gathered: torch.Tensor, order: list[tuple[int, int]]) -> torch.Tensor:
    """`[W, R, n_local, P]` gathered per rank -> `[R, n_chunks, P]` in global chunk order."""
    return torch.stack([gathered[rank, :, local] for rank, local in order], dim=1)


# ------------------------------------------------------------------------------------------------ driver
def _check(name: str, placement: SPPlacement, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    if not isinstance(placement, SPPlacement):
        raise ValueError(f"{name}: placement must be an SPPlacement (from shard_batch), got {type(placement)}")
    if q.dim() != 4 or k.shape != q.shape or v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"{name}: need q, k [B, T_local, H, K] and v [B, T_local, H, V], got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    rows, local_len = q.shape[:2]
    if local_len != placement.local_len or rows != placement.position_ids.shape[0]:
        raise ValueError(f"{name}: tensors hold [B={rows}, T_local={local_len}] tokens but the placement has "
                         f"[B={placement.position_ids.shape[0]}, T_local={placement.local_len}]")


def _flat(x: torch.Tensor | None) -> torch.Tensor | None:
    """`[B, T, ...]` -> `[1, B*T, ...]` (packed layout the ops want with cu_seqlens)."""
    return None if x is None else x.reshape((1, -1) + tuple(x.shape[2:]))


def _run_sp(name, q, k, v, placement, cu_seqlens, summarise):
    """Shared LASP-2 driver.

    `summarise(cu, last_seg, has_start, doc_start)` returns `(a, b, matrix, finish)`: the local chunk summaries and
    a function `finish(initial, continuing)` giving this rank's output from the state entering each local segment
    (`initial [n_seg, H, K, V]`, zero where a segment starts a document; `continuing` lists the segments that
    continue a document from an earlier chunk). The summaries' AllGather is posted
    before `finish`'s state-independent work would need it, so that work overlaps with the collective.
    """
    _check(name, placement, q, k, v)
    rows, local_len = q.shape[:2]
    cu, first_seg, last_seg, has_start, doc_start = _segments(placement, cu_seqlens, rows, local_len)
    a, b, matrix, finish = summarise(cu, last_seg, has_start, doc_start)
    if placement.num_chunks == 1:
        # the whole row is one chunk: nothing enters it
        return finish(None, []).reshape(v.shape)
    pending = start_gather(a, b, placement)
    finish.prepare()  # state-independent local work while the summaries travel
    entering = _EnteringStates.apply(a, b, pending.wait(), placement, matrix)   # [B, n_local, H, K, V]
    continues = placement.continues.to(entering.device)
    n_seg = cu.numel() - 1
    initial = entering.new_zeros((n_seg,) + tuple(entering.shape[2:]))
    continuing = first_seg[continues]
    initial = initial.index_copy(0, continuing, entering[continues])
    return finish(initial, continuing.tolist()).reshape(v.shape)


class _AffineOutput:
    """A linear op's output is affine in the state entering each segment: o_t = o0_t + P_t S_in(segment of t),
    with o0 the output from a zero state and P_t [H, K] the map of the entering state into token t's output.
    `prepare()` computes (o0, P) — the work that overlaps with the AllGather — and calling with the entering
    states adds P_t S_in for the segments that continue a document."""

    def __init__(self, compute, cu: torch.Tensor):
        self.compute, self.cu = compute, cu
        self.o0 = self.p = None

    def prepare(self) -> None:
        if self.o0 is None:
            self.o0, self.p = self.compute()

    def __call__(self, initial: torch.Tensor | None, continuing: list[int]) -> torch.Tensor:
        self.prepare()
        if initial is None:
            return self.o0
        if not continuing:
            # Nothing enters this rank, but every rank must take part in the backward AllGather of
            # `_EnteringStates`: keep the entering states in the graph with a zero contribution.
            return self.o0 + (initial.sum() * 0).to(self.o0.dtype)
        bounds = self.cu.tolist()
        active = set(continuing)
        pieces = []
        for seg, (lo, hi) in enumerate(zip(bounds, bounds[1:])):
            piece = self.o0[:, lo:hi]
            if seg in active:  # a continuing segment: add what the entering state contributes
                contribution = torch.einsum("bthk,hkv->bthv", self.p[:, lo:hi].to(initial.dtype), initial[seg])
                piece = piece + contribution.to(piece.dtype)
            pieces.append(piece)
        return torch.cat(pieces, dim=1)


def _default_op(name: str):
    import lctrain.kernels as kernels  # imported late: the kernel package is optional for sharding alone
    return getattr(kernels, name)


def sp_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor | None = None,
                        scale: float | None = None, placement: SPPlacement | None = None, backend: str | None = None,
                        cu_seqlens: torch.Tensor | None = None, op: Callable | None = None) -> torch.Tensor:
    """Linear attention over the whole (sharded) sequence; returns this rank's output `[B, T_local, H, V]`.

    q, k `[B, T_local, H, K]`, v `[B, T_local, H, V]`; log_decay None, `[H]` or `[B, T_local, H]` (<= 0);
    placement from `shard_batch`; cu_seqlens optional local document offsets (document starts are otherwise
    read from `placement.position_ids`); op defaults to `lctrain.kernels.linear_attention`.
    Exact (up to float rounding) w.r.t. the op on the full sequence, gradients included.
    """
    op = op or _default_op("linear_attention")
    name = "sp_linear_attention"
    if log_decay is not None and log_decay.dim() not in (1, 3):
        raise ValueError(f"{name}: log_decay must be None, [H] or [B, T_local, H], got {tuple(log_decay.shape)}")
    flat_decay = _flat(log_decay) if log_decay is not None and log_decay.dim() == 3 else log_decay
    qf, kf, vf = _flat(q), _flat(k), _flat(v)

    def summarise(cu, last_seg, has_start, doc_start):
        # Closed form, no op call: B = sum_t exp(g_{t+1} + ... + g_end) k_t v_t^T over the chunk's last segment.
        rows, n_local, c = doc_start.shape
        heads = q.shape[2]
        dtype = torch.promote_types(v.dtype, torch.float32)
        if log_decay is None:
            g = q.new_zeros((), dtype=dtype).expand(rows, n_local, c, heads)
        elif log_decay.dim() == 1:
            g = log_decay.to(dtype).expand(rows, n_local, c, heads)
        else:
            g = log_decay.to(dtype).reshape(rows, n_local, c, heads)
        decay_after = torch.flip(torch.cumsum(torch.flip(g, [2]), 2), [2]) - g          # sum_{u > t} g_u
        starts_after = torch.flip(torch.cumsum(torch.flip(doc_start.long(), [2]), 2), [2]) - doc_start.long()
        in_last_segment = (starts_after == 0).to(dtype)                                  # no start after t
        weight = torch.exp(decay_after) * in_last_segment[..., None]                     # [B, n, c, H]
        # weight folded into k first: a plain batched matmul (a 3-operand einsum may build k v^T per token)
        weighted_k = k.reshape(rows, n_local, c, heads, -1).to(dtype) * weight[..., None]
        b = torch.einsum("bntHk,bntHv->bnHkv", weighted_k, v.reshape(rows, n_local, c, heads, -1).to(dtype))
        a = torch.exp(g.sum(dim=2)) * (~has_start).to(dtype)[..., None]

        def compute():
            # zero-state output of every segment, and P_t = scale exp(G_t) q_t with G_t the log-decay summed from
            # the segment start through t: the entering state reaches token t decayed by exp(G_t)
            o0, _ = op(qf, kf, vf, log_decay=flat_decay, scale=scale, initial_state=None, output_final_state=False,
                       cu_seqlens=cu, backend=backend)
            g_tok = g.reshape(1, rows * n_local * c, heads)
            seg_of = torch.repeat_interleave(torch.arange(cu.numel() - 1, device=cu.device), (cu[1:] - cu[:-1]).long())
            total = torch.cumsum(g_tok, dim=1)
            before = torch.cat([total.new_zeros(1, 1, heads), total[:, :-1]], dim=1)
            seg_offset = before[:, cu[:-1].long()][:, seg_of]                            # sum of g before the segment
            s = q.shape[-1] ** -0.5 if scale is None else scale
            p = qf.to(dtype) * (s * torch.exp(total - seg_offset))[..., None]
            return o0, p
        return a, b, False, _AffineOutput(compute, cu)

    return _run_sp(name, q, k, v, placement, cu_seqlens, summarise)


def sp_gated_delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                        scale: float | None = None, placement: SPPlacement | None = None, backend: str | None = None,
                        cu_seqlens: torch.Tensor | None = None, op: Callable | None = None) -> torch.Tensor:
    """Gated delta rule over the whole (sharded) sequence; returns this rank's output `[B, T_local, H, V]`.

    q, k `[B, T_local, H, K]`, v `[B, T_local, H, V]`, g `[B, T_local, H]` (<= 0), beta `[B, T_local, H]`;
    op defaults to `lctrain.kernels.gated_delta_rule`. The transition matrix A of a chunk is the op's final
    state from `initial_state = I` with `v = 0`; it is computed in the same op call as B by running the op on
    `[0 | v]` (K + V value columns) from `[I | 0]` (columns of the state evolve independently).
    """
    op = op or _default_op("gated_delta_rule")
    name = "sp_gated_delta_rule"
    for label, t in (("g", g), ("beta", beta)):
        if t.shape != q.shape[:3]:
            raise ValueError(f"{name}: {label} must be [B, T_local, H] = {tuple(q.shape[:3])}, got {tuple(t.shape)}")
    qf, kf, vf, gf, bf = _flat(q), _flat(k), _flat(v), _flat(g), _flat(beta)

    def summarise(cu, last_seg, has_start, doc_start):
        key_dim = k.shape[-1]
        n_seg = cu.numel() - 1
        augmented = torch.cat([vf.new_zeros(vf.shape[:3] + (key_dim,)), vf], dim=-1)
        eye = torch.eye(key_dim, dtype=torch.promote_types(v.dtype, torch.float32), device=v.device)
        start = torch.cat([eye.expand(n_seg, q.shape[2], key_dim, key_dim),
                           eye.new_zeros(n_seg, q.shape[2], key_dim, v.shape[-1])], dim=-1)
        # One call gives everything: the state columns evolve independently, so from [I | 0] with values [0 | v]
        # the output is [P_t | o0_t] (P_t = scale q_t^T Phi_t maps the entering state into token t's output)
        # and the final state is [A | B] for each segment.
        out, final = op(qf, kf, augmented, gf, bf, scale=scale, initial_state=start, output_final_state=True,
                        cu_seqlens=cu, backend=backend)
        final = final[last_seg]                                          # [B, n, H, K, K + V]
        a = final[..., :key_dim] * (~has_start).to(final.dtype)[..., None, None, None]
        return a, final[..., key_dim:], True, _AffineOutput(lambda: (out[..., key_dim:], out[..., :key_dim]), cu)

    return _run_sp(name, q, k, v, placement, cu_seqlens, summarise)
