"""Dense attention with the probabilities materialised, for MoA profiling (`lctrain.moa.profile`) only: O(T^2)."""
from __future__ import annotations

import torch

from lctrain.models.context import document_ids


def probed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, position_ids: torch.Tensor, scale: float,
                     probe) -> torch.Tensor:
    """Causal, document-masked attention whose probabilities `[B, H, T, T]` are handed to `probe(probs)`, which
    may keep them (MoA profiling reads their gradient) and returns the probabilities to use."""
    group = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
    docs = document_ids(position_ids)
    index = torch.arange(q.shape[1], device=q.device)
    mask = (docs[:, :, None] == docs[:, None, :]) & (index[None, None, :] <= index[None, :, None])
    scores = torch.einsum("bihd,bjhd->bhij", q, k) * scale
    probs = probe(scores.masked_fill(~mask[:, None], float("-inf")).softmax(dim=-1))
    return torch.einsum("bhij,bjhd->bihd", probs, v)
