"""The activation-memory estimate printed by `--dry-run` (per process, per micro-batch).

For the mixer types `lctrain plan` models (attn, gdn, linear, conv) this is the planner's activation model
(`lctrain.plan.activations`: saved tensors per mixer type, sequence-parallel shards, checkpointing), so the dry
run and the plan agree. Other mixer types get the older rough count: per layer and token about 8 d + 4 ffn
elements, the [H, T, T] probabilities of the math attention path, one loss chunk of fp32 logits.
"""
from __future__ import annotations

import torch

from lctrain.models.blocks import default_ffn_dim
from lctrain.models.loss import loss_chunk_size


def activation_memory_estimate(cfg, model) -> int:
    from lctrain.plan.shape import SUPPORTED
    if set(model.layer_types) <= set(SUPPORTED):
        return _planned(cfg, model)
    return _rough(cfg, model)


def _planned(cfg, model) -> int:
    from lctrain.plan.activations import activation_bytes
    from lctrain.plan.shape import shape_of
    on_gpu = torch.cuda.is_available()
    elem = 4 if cfg.train.dtype == "float32" or (cfg.train.dtype == "auto" and not on_gpu) else 2
    shape = shape_of(model)
    parts = activation_bytes(shape, cfg.train.micro_batch_size, cfg.data.seq_len, cfg.parallel.sp,
                             cfg.parallel.layout, cfg.parallel.attn, elem, cfg.model.activation_checkpointing,
                             "triton" if on_gpu else "torch")
    tokens = cfg.train.micro_batch_size * cfg.data.seq_len // cfg.parallel.sp
    logits = min(tokens, cfg.model.loss_chunk_tokens) * shape.vocab_size * 4 * 2
    return sum(parts.values()) + logits


def _rough(cfg, model) -> int:
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
