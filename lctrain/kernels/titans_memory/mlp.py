"""Titans memory with a two-layer MLP per head (the "deep memory" of the paper), in PyTorch.

The memory is f_W(x) = silu(x W1) W2 with W = (W1 `[K, F]`, W2 `[F, V]`) per head. Training it online follows the
same rule as the linear memory, on every weight tensor at once:

    u_t = grad_W 1/2 ||f_W(k_t) - v_t||^2 at W = W0 (the weights entering the chunk)
    S_t = eta_t S_{t-1} - theta_t u_t,   W_t = (1 - alpha_t) W_{t-1} + S_t,   o_t = f_{W_t}(q_t)

Per-token gradients of a whole chunk come from one `torch.func.vmap(torch.func.grad(...))` call, so a chunk is
parallel; the per-token weights W_t are the same decay-weighted sums as in `chunk.py` (`chunk_coefficients`).
Every batch row is one sequence. Memory: the per-token weights of one chunk, `[B, H, C, K*F + F*V]`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.func import grad, vmap

from lctrain.kernels.titans_memory.chunk import chunk_coefficients

MlpWeights = tuple[torch.Tensor, torch.Tensor]


def mlp_memory_read(weights: MlpWeights, x: torch.Tensor) -> torch.Tensor:
    """f_W(x) for x `[..., K]` and weights `[..., K, F]`, `[..., F, V]` with matching leading dims."""
    hidden = F.silu((x.unsqueeze(-2) @ weights[0]).squeeze(-2))
    return (hidden.unsqueeze(-2) @ weights[1]).squeeze(-2)


def _token_loss(weights: MlpWeights, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    return 0.5 * (mlp_memory_read(weights, key) - value).square().sum()


# Per-token gradients for [B, H] weight sets and [B, H, C] tokens: tokens share their row's and head's weights.
_chunk_gradients = vmap(vmap(vmap(grad(_token_loss), in_dims=(None, 0, 0))))


def mlp_titans_memory(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    alpha: torch.Tensor,
    eta: torch.Tensor,
    theta: torch.Tensor,
    chunk_size: int,
    initial_state: tuple[MlpWeights, MlpWeights],
) -> tuple[torch.Tensor, tuple[MlpWeights, MlpWeights]]:
    """Deep-memory Titans update.

    Args:
        q, k: `[B, T, H, K]`.  v: `[B, T, H, V]`.  alpha, eta, theta: `[B, T, H]` in [0, 1].
        chunk_size: tokens whose surprise uses the same entering weights.
        initial_state: `((W1, W2), (S1, S2))`: weights and momenta `[B, H, K, F]`, `[B, H, F, V]`. The weights
            must not all be zero (an all-zero MLP has zero gradient and never learns); models pass learned ones.

    Returns:
        o `[B, T, H, V]` (q's dtype) and the final `((W1, W2), (S1, S2))` in the compute dtype.
    """
    batch, length, heads, _ = q.shape
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    weights = tuple(w.to(compute) for w in initial_state[0])
    momenta = tuple(s.to(compute) for s in initial_state[1])
    if length == 0:
        return v.new_zeros(batch, 0, heads, v.shape[-1]), (weights, momenta)
    chunk_size = max(1, min(chunk_size, length))
    coef = chunk_coefficients(alpha, eta, theta, chunk_size, compute)
    qh, kh, vh = (x.to(compute).transpose(1, 2) for x in (q, k, v))  # [B, H, T, D]
    outputs = []
    for c, start in enumerate(range(0, length, chunk_size)):
        size = min(chunk_size, length - start)
        piece = slice(start, start + size)
        surprises = _chunk_gradients(weights, kh[:, :, piece], vh[:, :, piece])  # each [B, H, C, ...]
        keep_m0, keep_s0 = coef.keep_m0[:, :, c, :size], coef.keep_s0[:, :, c, :size]
        s0_in_memory = coef.s0_in_memory[:, :, c, :size]
        in_memory = coef.in_memory[:, :, c, :size, :size]
        momentum_weight = coef.momentum_weight[:, :, c, :size, :size]

        def per_token(w0, s0, u, start_weight, s0_weight, surprise_weight):
            # X_t = start_weight_t X0 + s0_weight_t S0 - sum_j surprise_weight[t, j] u_j, for every token t.
            spread = (1,) * (w0.dim() - 2)
            mixed = torch.einsum("bhtj,bhjm->bhtm", surprise_weight, u.flatten(3)).view(u.shape)
            return (start_weight.view(*start_weight.shape, *spread) * w0.unsqueeze(2)
                    + s0_weight.view(*s0_weight.shape, *spread) * s0.unsqueeze(2) - mixed)

        token_weights = [per_token(w, s, u, keep_m0, s0_in_memory, in_memory)
                         for w, s, u in zip(weights, momenta, surprises)]
        token_momenta = [per_token(torch.zeros_like(s), s, u, torch.zeros_like(keep_s0), keep_s0, momentum_weight)
                         for s, u in zip(momenta, surprises)]
        outputs.append(mlp_memory_read(tuple(token_weights), qh[:, :, piece]))
        weights = tuple(w[:, :, -1] for w in token_weights)
        momenta = tuple(s[:, :, -1] for s in token_momenta)
    o = torch.cat(outputs, dim=2).transpose(1, 2)
    return o.to(q.dtype), (weights, momenta)
