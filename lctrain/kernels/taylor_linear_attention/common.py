"""Feature maps and the state layout of `taylor_linear_attention`.

The score is BASED's second-order Taylor expansion of exp: with x = scale * (q . k),

    score(q, k) = 1 + x + x^2 / 2 = phi_q(q) . phi_k(k)
    phi_q(q) = [1, scale * q, (scale^2 / 2) * vec(q q^T)]      phi_k(k) = [1, k, vec(k k^T)]

both of size F = 1 + D + D^2 (the constants sit on the query side, so the state holds raw moments of k and
does not depend on the scale).

State layout (`[N, H, F, V + 1]`, fp32; float64 for float64 inputs on the torch/naive paths): the running sum
S = sum_s phi_k(k_s) [v_s, 1]^T, i.e.

* row 0: zeroth-order moments (sum of v; the last column counts tokens),
* rows 1 .. D: first-order moments sum k_a [v, 1],
* rows 1 + D + a * D + b: second-order moments sum k_a k_b [v, 1],
* columns 0 .. V-1 feed the numerator, column V (the appended ones) the normaliser sum_s score(q_t, k_s).

It is a plain sum over tokens, so states of consecutive chunks add (LASP-2 with A = identity).
"""
from __future__ import annotations

import torch

MAX_FEATURE_DIM = 32


def state_rows(feature_dim: int) -> int:
    """F = 1 + D + D^2: rows of the state for a feature dim D."""
    return 1 + feature_dim + feature_dim * feature_dim


def _outer(x: torch.Tensor) -> torch.Tensor:
    return (x[..., :, None] * x[..., None, :]).flatten(-2)


def key_features(k: torch.Tensor) -> torch.Tensor:
    """phi_k: `[..., D]` -> `[..., 1 + D + D^2]` = [1, k, vec(k k^T)]."""
    return torch.cat([k.new_ones(*k.shape[:-1], 1), k, _outer(k)], dim=-1)


def query_features(q: torch.Tensor, scale: float) -> torch.Tensor:
    """phi_q: `[..., D]` -> `[..., 1 + D + D^2]` = [1, scale q, (scale^2 / 2) vec(q q^T)]."""
    scaled = q * scale
    return torch.cat([q.new_ones(*q.shape[:-1], 1), scaled, 0.5 * _outer(scaled)], dim=-1)


def with_ones(v: torch.Tensor) -> torch.Tensor:
    """[v, 1]: `[..., V]` -> `[..., V + 1]`; the extra column accumulates the normaliser."""
    return torch.cat([v, v.new_ones(*v.shape[:-1], 1)], dim=-1)


def document_spans(cu_seqlens: torch.Tensor | None, batch: int, length: int) -> list[tuple[int, int, int]]:
    """`(batch_row, start, end)` of every sequence, in state order (each row, or each packed document)."""
    if cu_seqlens is None:
        return [(row, 0, length) for row in range(batch)]
    offsets = cu_seqlens.tolist()
    return [(0, offsets[n], offsets[n + 1]) for n in range(len(offsets) - 1)]
