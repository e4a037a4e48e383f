"""LASP-2 for BASED's Taylor linear attention (`lctrain.kernels.taylor_linear_attention`).

The op's state is a plain sum over tokens, S = sum_s phi_k(k_s) [v_s, 1]^T (`[H, 1 + D + D^2, V + 1]`), so a
chunk maps the state entering it by

    S_out = A S_in + B,    A = 1 (0 if a document starts inside the chunk),
                           B = sum over the chunk's last segment of phi_k(k_t) [v_t, 1]^T   (closed form).

The summaries go through the shared LASP-2 driver (`lasp2._run_sp`: one AllGather forward, one backward). The
normalised output o_t = num_t / (den_t + eps) is a ratio of two terms that are each affine in the entering state,
so instead of an affine correction the op itself is run once from the entering states (packed segments with
per-segment `initial_state`): the result then has exactly the single-process op's arithmetic and dtypes, and the
op's autograd carries the gradient into the entering states.
"""
from __future__ import annotations

from typing import Callable

import torch

from lctrain.parallel.lasp2 import _default_op, _flat, _run_sp
from lctrain.parallel.sharding import SPPlacement


def _key_features(k: torch.Tensor) -> torch.Tensor:
    """phi_k(k) = [1, k, vec(k k^T)]: `[..., D]` -> `[..., 1 + D + D^2]` (the op's state-row layout)."""
    outer = (k[..., :, None] * k[..., None, :]).flatten(-2)
    return torch.cat([k.new_ones(k.shape[:-1] + (1,)), k, outer], dim=-1)


class _FromEnteringState:
    """`finish` for `_run_sp`: run the op once over all local segments from the state entering each of them."""

    def __init__(self, run: Callable[[torch.Tensor | None], torch.Tensor]):
        self.run = run

    def prepare(self) -> None:
        """Nothing is state-independent here: the whole output depends on the entering states."""

    def __call__(self, initial: torch.Tensor | None, continuing: list[int]) -> torch.Tensor:
        if initial is not None and not continuing:
            # Nothing enters this rank, yet it must join the backward AllGather of the entering states:
            # keep them in the graph (zero contribution) rather than hand the op a state with no effect.
            return self.run(None) + (initial.sum() * 0).to(initial.dtype)
        return self.run(initial)


def sp_taylor_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
                               normalize: bool = True, eps: float = 1e-6, placement: SPPlacement | None = None,
                               backend: str | None = None, cu_seqlens: torch.Tensor | None = None,
                               op: Callable | None = None) -> torch.Tensor:
    """Taylor (BASED) linear attention over the whole sharded sequence; returns this rank's `[B, T_local, H, V]`.

    q, k `[B, T_local, H, D]`, v `[B, T_local, H, V]`; scale / normalize / eps as in the op; placement from
    `shard_batch`; cu_seqlens optional local document offsets over the flattened `B * T_local` tokens (document
    starts are otherwise read from `placement.position_ids`); op defaults to
    `lctrain.kernels.taylor_linear_attention`. Exact (up to float rounding) w.r.t. the op on the full sequence,
    gradients included. Collective over the SP group.
    """
    op = op or _default_op("taylor_linear_attention")
    name = "sp_taylor_linear_attention"
    qf, kf, vf = _flat(q), _flat(k), _flat(v)

    def summarise(cu, last_seg, has_start, doc_start):
        rows, n_local, c = doc_start.shape
        heads = q.shape[2]
        # the op's state precision: float64 for float64 inputs, else fp32
        dtype = torch.promote_types(v.dtype, torch.float32)
        starts_after = torch.flip(torch.cumsum(torch.flip(doc_start.long(), [2]), 2), [2]) - doc_start.long()
        in_last_segment = (starts_after == 0).to(dtype)                                    # [B, n, c]
        features = _key_features(k.to(dtype)).reshape(rows, n_local, c, heads, -1)
        features = features * in_last_segment[..., None, None]
        values = v.to(dtype).reshape(rows, n_local, c, heads, -1)
        values = torch.cat([values, values.new_ones(values.shape[:-1] + (1,))], dim=-1)  # [v, 1]
        b = torch.einsum("bntHf,bntHv->bnHfv", features, values)                           # [B, n, H, F, V+1]
        a = (~has_start).to(dtype)[..., None].expand(rows, n_local, heads).contiguous()    # A = 1 or 0

        def run(initial):
            o, _ = op(qf, kf, vf, scale=scale, normalize=normalize, eps=eps, initial_state=initial,
                      output_final_state=False, cu_seqlens=cu, backend=backend)
            return o
        return a, b, False, _FromEnteringState(run)

    return _run_sp(name, q, k, v, placement, cu_seqlens, summarise)
