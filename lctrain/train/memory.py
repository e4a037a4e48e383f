"""A rough activation-memory estimate printed by `--dry-run` (per process, per micro-batch).

Per layer and token, a pre-norm block keeps about: 2 norm inputs/outputs (4·d), the mixer's q/k/v/o projections
(≈ 4·d plus the mixer's own expansion), and the SwiGLU's gate/up/act/product (4·ffn) — in the activation dtype. Full
attention on the math path adds the [H, T, T] probabilities for masked (packed) batches; flash kernels do not.
With activation checkpointing only each layer's input (d per token) is kept, plus one layer's full set during
backward. The loss keeps one chunk of fp32 logits.
"""
from __future__ import annotations

from lctrain.models.blocks import default_ffn_dim
from lctrain.models.loss import loss_chunk_size


def activation_memory_estimate(cfg, model) -> int:
    m = cfg.model
    tokens = cfg.train.micro_batch_size * cfg.data.seq_len // cfg.parallel.sp
    elem = 2 if cfg.train.dtype == "bfloat16" else 4
    ffn = m.ffn_dim or default_ffn_dim(m.d_model)
    per_layer = tokens * (8 * m.d_model + 4 * ffn) * elem
    attn_layers = sum(1 for t in model.layer_types if t == "attn")
    quadratic = cfg.train.micro_batch_size * m.n_heads * (cfg.data.seq_len // cfg.parallel.sp) * cfg.data.seq_len * elem
    logits = loss_chunk_size(m.loss_chunk_tokens, tokens, m.vocab_size) * m.vocab_size * 4 * 2
    n_layers = len(model.layer_types)
    if m.activation_checkpointing:
        return n_layers * tokens * m.d_model * elem + per_layer + quadratic + logits
    return n_layers * per_layer + attn_layers * quadratic + logits
