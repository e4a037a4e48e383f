"""Cross-entropy over the vocabulary computed a chunk of tokens at a time.

Materialising [B*T, vocab] logits is what runs long-context training out of memory first (T = 128K and a 128K
vocabulary is 64 GiB in fp32). Each chunk's logits are recomputed in backward (activation checkpointing of the
head + loss), so peak memory holds one chunk of logits.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def _chunk_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = F.linear(hidden, weight)
    if logits.dtype in (torch.float16, torch.bfloat16):  # softmax over a large vocabulary wants fp32
        logits = logits.float()
    return F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum")


def chunked_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                              chunk_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed token cross-entropy and the number of target tokens.

    hidden [N, D] (final-norm output), weight [vocab, D] (LM head), labels [N] with -100 = ignored.
    Returns (loss_sum fp32 scalar, n_targets int64 scalar). The caller divides by the global number of targets.
    """
    total = hidden.new_zeros((), dtype=torch.promote_types(hidden.dtype, torch.float32))
    for start in range(0, hidden.shape[0], chunk_tokens):
        h = hidden[start:start + chunk_tokens]
        y = labels[start:start + chunk_tokens]
        if torch.is_grad_enabled() and h.requires_grad:
            total = total + checkpoint(_chunk_loss, h, weight, y, use_reentrant=False)
        else:
            total = total + _chunk_loss(h, weight, y)
    return total, (labels != -100).sum()
