"""The sequential part of chunked Gated DeltaNet, with a hand-written backward.

Per chunk c (WY form, see chunk.py), with S_c the state entering it:

    delta_c = u_c - w_c S_c,        S_{c+1} = d_c S_c + kt_c^T delta_c        (d_c = exp(G_C) of chunk c)

Left to autograd, every step of this walk costs four matmuls forward and about eight backward, each tiny (one
chunk of every row and head). Here the walk does only the two matmuls the dependency forces, both directions; the
states it passes through are returned, so the caller computes the outputs (q S_c + qk delta) and this function
computes the weight gradients (dw = -ddelta S^T, dkt = delta dS^T, dd = <dS, S>) as single batched matmuls over all
chunks.

Shapes: any leading batch dims `...` (rows and heads), then the chunk axis N:
    u [..., N, C, V], w [..., N, C, K], kt [..., N, C, K], decay [..., N], state0 [..., K, V]
Returns states [..., N, K, V] (the state entering each chunk), delta [..., N, C, V], final [..., K, V].
"""
from __future__ import annotations

import torch


def _rows(x: torch.Tensor) -> torch.Tensor:
    """[..., m, n] -> [R, m, n] (a view wherever the strides allow) for baddbmm."""
    return x.reshape(-1, *x.shape[-2:])


class _ChunkStateWalk(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, w, kt, decay, state0):
        num_chunks = u.shape[-3]
        lead = u.shape[:-3]
        states = u.new_empty(lead + (num_chunks,) + state0.shape[-2:])
        deltas = torch.empty_like(u)
        state = _rows(state0)
        for c in range(num_chunks):
            states[..., c, :, :] = state.view(state0.shape)
            delta = torch.baddbmm(_rows(u[..., c, :, :]), _rows(w[..., c, :, :]), state, alpha=-1)
            deltas[..., c, :, :] = delta.view(lead + delta.shape[-2:])
            state = torch.baddbmm(state * _rows(decay[..., c, None, None]), _rows(kt[..., c, :, :]).transpose(-1, -2),
                                  delta)
        ctx.save_for_backward(w, kt, decay, states, deltas)
        return states, deltas, state.view(state0.shape)

    @staticmethod
    def backward(ctx, d_states, d_deltas, d_final):
        w, kt, decay, states, deltas = ctx.saved_tensors
        num_chunks = w.shape[-3]
        lead = w.shape[:-3]
        state_shape = lead + states.shape[-2:]
        grad = states.new_zeros(state_shape) if d_final is None else d_final
        grad = _rows(grad)
        d_delta_all = torch.empty_like(deltas)
        d_next_all = torch.empty_like(states)  # gradient reaching the state *leaving* each chunk
        for c in range(num_chunks - 1, -1, -1):
            d_next_all[..., c, :, :] = grad.view(state_shape)
            d_delta = _rows(kt[..., c, :, :]) @ grad
            if d_deltas is not None:
                d_delta = d_delta + _rows(d_deltas[..., c, :, :])
            d_delta_all[..., c, :, :] = d_delta.view(lead + d_delta.shape[-2:])
            carried = grad * _rows(decay[..., c, None, None])
            if d_states is not None:
                carried = carried + _rows(d_states[..., c, :, :])
            grad = torch.baddbmm(carried, _rows(w[..., c, :, :]).transpose(-1, -2), d_delta, alpha=-1)
        d_w = -(d_delta_all @ states.transpose(-1, -2))
        d_kt = deltas @ d_next_all.transpose(-1, -2)
        d_decay = (d_next_all * states).sum((-1, -2))
        return d_delta_all, d_w, d_kt, d_decay, grad.view(state_shape)


def chunk_state_walk(u, w, kt, decay, state0):
    """(states entering each chunk, delta, final state); see the module docstring."""
    return _ChunkStateWalk.apply(u, w, kt, decay, state0)
