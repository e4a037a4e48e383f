"""The activation-memory estimate printed by `--dry-run` (per process, per micro-batch).

For the mixer types `lctrain plan` models (attn, gdn, linear, conv) this is the planner's activation model
(`lctrain.plan.activations`: saved tensors per mixer type, sequence-parallel shards, checkpointing), so the dry
run and the plan agree. Other mixer types get the older rough count: per layer and token about 8 d + 4 ffn
elements (softmax attention runs on the fused op, so no [H, T, T] term), and one loss chunk of fp32 logits
(`lctrain.models.loss.loss_chunk_size`, also for `model.loss_chunk_tokens: 0`).
"""
from __future__ import annotations

import dataclasses

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
    logits = loss_chunk_size(cfg.model.loss_chunk_tokens, tokens, shape.vocab_size) * shape.vocab_size * 4 * 2
    return sum(parts.values()) + logits


def _rough(cfg, model) -> int:
    m = cfg.model
    tokens = cfg.train.micro_batch_size * cfg.data.seq_len // cfg.parallel.sp
    elem = 2 if cfg.train.dtype == "bfloat16" else 4
    ffn = m.ffn_dim or default_ffn_dim(m.d_model)
    per_layer = tokens * (8 * m.d_model + 4 * ffn) * elem
    logits = loss_chunk_size(m.loss_chunk_tokens, tokens, m.vocab_size) * m.vocab_size * 4 * 2
    n_layers = len(model.layer_types)
    if m.activation_checkpointing:
        return n_layers * tokens * m.d_model * elem + per_layer + logits
    return n_layers * per_layer + logits


def fsdp_memory_per_gpu(cfg, model, world: int) -> dict[str, float]:
    """Bytes per GPU under `train.engine: fsdp` on `world` GPUs (estimate, as on CUDA: bf16 compute, attention
    through flash/ring kernels with no [T, T] scores): fp32 master weights, fp32 gradients and AdamW's two fp32
    moments, each sharded over the world (plus full gradients in bf16 when micro-batches accumulate with
    `parallel.fsdp_grad_sync: step`); the largest block gathered in bf16 (twice: the next one is prefetched);
    activations per the module docstring, for this rank's T / sp tokens."""
    n_params = sum(p.numel() for p in model.parameters())
    largest_block = max((sum(p.numel() for p in layer.parameters()) for layer in model.layers), default=0)
    root = n_params - sum(p.numel() for layer in model.layers for p in layer.parameters())
    compute_bytes = 2 if cfg.train.dtype != "float32" else 4
    m = cfg.model
    tokens = cfg.train.micro_batch_size * cfg.data.seq_len // cfg.parallel.sp
    per_layer = tokens * (8 * m.d_model + 4 * (m.ffn_dim or default_ffn_dim(m.d_model))) * compute_bytes
    kept = tokens * m.d_model * compute_bytes if m.activation_checkpointing else per_layer
    logits = loss_chunk_size(m.loss_chunk_tokens, tokens, m.vocab_size) * m.vocab_size * 4 * 2
    out = {
        "weights": 4 * n_params / world,
        "gradients": 4 * n_params / world,
        "adamw": 8 * n_params / world,
        "gathered": compute_bytes * (2 * largest_block + root),
        "activations": len(model.layers) * kept + per_layer * m.activation_checkpointing + logits,
    }
    dp = max(world // cfg.parallel.sp, 1)
    accum = cfg.train.tokens_per_step // (cfg.train.micro_batch_size * cfg.data.seq_len * dp) or 1
    if accum > 1 and cfg.parallel.fsdp_grad_sync == "step":  # micro-batches accumulate full, unsharded gradients
        out["gradients"] += compute_bytes * n_params
    out["total"] = sum(out.values())
    return out


def fsdp_memory_lines(cfg, model, worlds: list[int]) -> list[str]:
    """Summary lines for `--dry-run`: the per-GPU estimate under fsdp at each world size (the recipe's
    parallel.sp kept). For the layer types `lctrain plan` models this is the planner's figure for the recipe's
    layout (so the dry run and the plan agree); otherwise `fsdp_memory_per_gpu`."""
    from lctrain.plan.shape import SUPPORTED
    planned = set(model.layer_types) <= set(SUPPORTED)
    lines = []
    for world in worlds:
        if world % cfg.parallel.sp:
            continue
        where = f"fsdp memory per GPU at {world} GPUs (dp {world // cfg.parallel.sp} x sp {cfg.parallel.sp}"
        if planned:
            from lctrain.plan.memory import memory_breakdown
            from lctrain.plan.search import current_candidate, workload_of
            from lctrain.plan.shape import shape_of
            candidate = dataclasses.replace(current_candidate(cfg, world), engine="fsdp")
            parts = memory_breakdown(shape_of(model), candidate, workload_of(cfg, world, 8))
            gib = {k: v / 2**30 for k, v in parts.items() if k != "total_gib"}
            act = sum(v for k, v in gib.items() if k.startswith("activations_"))
            lines.append(f"{where}, as `lctrain plan` models it): {parts['total_gib']:.1f} GiB with allocator "
                         f"margin and CUDA context = weights {gib['params']:.2f} + gradients {gib['grads']:.2f} + "
                         f"AdamW {gib['optimizer']:.2f} + gathered blocks {gib['buckets']:.2f} + activations "
                         f"{act:.2f} (peak of tensors {gib['peak_tensor_bytes']:.2f})")
            continue
        m = {k: v / 2**30 for k, v in fsdp_memory_per_gpu(cfg, model, world).items()}
        lines.append(f"{where}, estimate): {m['total']:.1f} GiB = weights {m['weights']:.2f} + gradients "
                     f"{m['gradients']:.2f} + AdamW {m['adamw']:.2f} + gathered blocks {m['gathered']:.2f} + "
                     f"activations {m['activations']:.2f}")
    return lines
