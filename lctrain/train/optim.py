"""AdamW with sensible weight-decay groups, and warmup + cosine / WSD / constant learning-rate schedules."""
from __future__ import annotations

import math

import torch
import torch.nn as nn


def no_decay(name: str, param: nn.Parameter) -> bool:
    """Norm gains, biases, embeddings and parameters a mixer marks `_no_weight_decay` (decay rates, dt biases)
    are not decayed: decaying them pulls gates and scales towards zero, not towards simplicity."""
    return (param.ndim < 2 or getattr(param, "_no_weight_decay", False) or "embed" in name.split(".")[0]
            or name.endswith(".bias"))


def build_optimizer(model: nn.Module, train_cfg) -> torch.optim.Optimizer:
    decay, keep = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (keep if no_decay(name, param) else decay).append(param)
    groups = [{"params": decay, "weight_decay": train_cfg.weight_decay},
              {"params": keep, "weight_decay": 0.0}]
    fused_ok = all(p.is_cuda for p in decay + keep)
    return torch.optim.AdamW(groups, lr=train_cfg.lr, betas=(train_cfg.beta1, train_cfg.beta2), eps=train_cfg.eps,
                             fused=True if fused_ok and decay + keep else None)


def lr_factor(step: int, train_cfg) -> float:
    """Multiplier on train.lr for optimizer step `step` (0-based): linear warmup, then the chosen decay down to
    train.min_lr_ratio at the last step."""
    total, warmup, floor = train_cfg.steps, train_cfg.warmup_steps, train_cfg.min_lr_ratio
    if warmup and step < warmup:
        return (step + 1) / warmup
    if train_cfg.schedule == "constant":
        return 1.0
    if train_cfg.schedule == "cosine":
        span = max(total - warmup, 1)
        progress = min((step - warmup) / span, 1.0)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    # WSD: warmup, stable at the peak, then a linear decay over the last `decay_fraction` of steps.
    decay_steps = max(int(round(total * train_cfg.decay_fraction)), 1)
    decay_start = total - decay_steps
    if step < decay_start:
        return 1.0
    return 1.0 - (1 - floor) * min((step - decay_start + 1) / decay_steps, 1.0)


def build_scheduler(optimizer: torch.optim.Optimizer, train_cfg) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, train_cfg))


def clip_and_step(params, optimizer, scheduler, grad_clip: float, loss: float) -> tuple[float, bool]:
    """Clip the gradients to `grad_clip` (0: no clipping, the norm is still measured; a sharded DTensor norm is
    reduced across its mesh), apply the update unless the loss or the norm is non-finite, advance the schedule.
    Returns (grad_norm, applied)."""
    max_norm = grad_clip if grad_clip > 0 else float("inf")
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
    applied = math.isfinite(loss) and math.isfinite(grad_norm)
    if applied:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()
    return grad_norm, applied
