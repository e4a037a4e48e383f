"""Distillation from a frozen teacher: alpha * tau^2 * KL(teacher || student) + (1 - alpha) * cross-entropy.

Both models' logits are formed a chunk of tokens at a time from their final hidden states, and each chunk is
recomputed in backward (as `lctrain.models.loss` does for cross-entropy), so `[T, vocab]` logits of neither model
exist. The KL is taken at temperature tau and scaled by tau^2 (Hinton et al., 2015), so its gradient keeps the
cross-entropy's scale whatever tau is; both terms are summed over target tokens (labels != -100), so the loop's
normalisation by the step's target count applies unchanged.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor
from torch.utils.checkpoint import checkpoint

from lctrain.models.loss import loss_chunk_size


def _at_least_fp32(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over a large vocabulary wants fp32; float64 (tests) stays float64."""
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


def _chunk_terms(student_hidden, student_head, teacher_hidden, teacher_head, labels, tau: float,
                 alpha: float) -> torch.Tensor:
    """[loss, kl, ce] summed over the chunk's target tokens (fp32)."""
    mask = labels != -100
    logits = _at_least_fp32(F.linear(student_hidden, student_head))
    with torch.no_grad():
        teacher_logp = F.log_softmax(_at_least_fp32(F.linear(teacher_hidden, teacher_head)) / tau, dim=-1)
    student_logp = F.log_softmax(logits / tau, dim=-1)
    kl_tokens = (teacher_logp.exp() * (teacher_logp - student_logp)).sum(-1)
    kl = (kl_tokens * mask).sum()
    ce = F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum")
    loss = alpha * tau * tau * kl + (1.0 - alpha) * ce
    return torch.stack([loss, kl.detach(), ce.detach()])


def distill_loss_sum(student_hidden: torch.Tensor, student_head: torch.Tensor, teacher_hidden: torch.Tensor,
                     teacher_head: torch.Tensor, labels: torch.Tensor, tau: float, alpha: float,
                     chunk_tokens: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """hidden `[N, D]` (each model's final-norm output), heads `[vocab, D]`, labels `[N]` (-100 ignored);
    `chunk_tokens` 0 sizes chunks like the cross-entropy's auto mode (`lctrain.models.loss.loss_chunk_size`).
    Returns (loss_sum, kl_sum, ce_sum, n_targets); only loss_sum carries a gradient (to the student)."""
    total = student_hidden.new_zeros(3, dtype=torch.promote_types(student_hidden.dtype, torch.float32))
    chunk_tokens = loss_chunk_size(chunk_tokens, student_hidden.shape[0], student_head.shape[0])
    for start in range(0, student_hidden.shape[0], chunk_tokens):
        piece = slice(start, start + chunk_tokens)
        args = (student_hidden[piece], student_head, teacher_hidden[piece], teacher_head, labels[piece], tau, alpha)
        if torch.is_grad_enabled() and student_hidden.requires_grad:
            total = total + checkpoint(_chunk_terms, *args, use_reentrant=False)
        else:
            total = total + _chunk_terms(*args)
    return total[0], total[1], total[2], (labels != -100).sum()


class Distiller:
    """Holds the frozen teacher and turns a training micro-batch into the distillation loss sum; accumulates the
    KL and cross-entropy sums of the current step for logging."""

    def __init__(self, teacher: torch.nn.Module, distill_cfg, chunk_tokens: int):
        self.teacher = teacher.eval().requires_grad_(False)
        self.cfg = distill_cfg
        self.chunk_tokens = distill_cfg.chunk_tokens or chunk_tokens
        self._sums = None

    def loss_sum(self, model, inputs: dict, ctx) -> tuple[torch.Tensor, torch.Tensor]:
        input_ids = inputs["input_ids"]
        with torch.no_grad():
            teacher_hidden = self.teacher(input_ids, ctx=ctx).hidden
        teacher_hidden = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])

        teacher_head = self.teacher.head_weight
        if isinstance(teacher_head, DTensor):  # a sharded teacher (fsdp) holds its head whole only in its forward
            teacher_head = teacher_head.full_tensor()

        def loss_fn(hidden, head_weight, labels):  # inside the student's forward: its head is whole there
            loss, kl, ce, n = distill_loss_sum(hidden, head_weight, teacher_hidden, teacher_head, labels,
                                               self.cfg.tau, self.cfg.alpha, self.chunk_tokens)
            sums = torch.stack([kl, ce]).detach().double()
            self._sums = sums if self._sums is None else self._sums + sums
            return loss, n

        out = model(input_ids, labels=inputs["labels"], ctx=ctx, loss_fn=loss_fn)
        return out.loss_sum, out.n_targets

    def step_metrics(self, n_global: float, reduce) -> dict:
        """Per-token KL and cross-entropy of the step just taken (summed over ranks by `reduce`)."""
        if self._sums is None:
            return {}
        sums = reduce(self._sums)
        self._sums = None
        return {"distill_kl": sums[0].item() / max(n_global, 1.0), "distill_ce": sums[1].item() / max(n_global, 1.0)}
