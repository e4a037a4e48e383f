"""Cross-entropy over the vocabulary, fused with the LM head, a chunk of tokens at a time.

Materialising [B*T, vocab] logits is what runs long-context training out of memory first (T = 128K and a 128K
vocabulary is 64 GiB in fp32). Recomputing each chunk's logits in backward bounds that memory but pays the head
matmul and the softmax twice. Here the forward pass of a chunk computes its logits, its loss and, when a gradient
will be needed, the gradients of the loss with respect to the chunk's hidden states and the head weight
(d logits = softmax - onehot), then drops the logits. Backward only scales those gradients by the incoming scalar.
Peak memory holds one chunk of fp32 logits, and the work is one forward plus one backward of the head: nothing is
recomputed.

`model.loss_chunk_tokens`: a positive value is the chunk size in tokens; 0 (auto) sizes chunks so that one chunk's
fp32 logits fit `AUTO_LOGITS_BUDGET_BYTES` — for small vocabularies and batches that is the whole batch at once.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

AUTO_LOGITS_BUDGET_BYTES = 256 * 2**20  # one chunk's fp32 logits under model.loss_chunk_tokens = 0
IGNORE_INDEX = -100


def loss_chunk_size(chunk_tokens: int, n_tokens: int, vocab_size: int) -> int:
    """Tokens per loss chunk: `chunk_tokens` when positive, otherwise as many as fit the auto logits budget."""
    if chunk_tokens > 0:
        return max(1, min(chunk_tokens, n_tokens))
    return max(1, min(n_tokens, AUTO_LOGITS_BUDGET_BYTES // (4 * max(vocab_size, 1))))


def _chunk_logits(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    logits = F.linear(hidden, weight)
    # softmax over a large vocabulary wants fp32 (also for bf16 autocast)
    return logits.float() if logits.dtype != torch.float64 else logits


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """sum_t CE(hidden_t @ weight^T, label_t); gradients computed during forward, chunk by chunk."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk):
        needs_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        acc_dtype = torch.promote_types(hidden.dtype, torch.float32)
        total = hidden.new_zeros((), dtype=acc_dtype)
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device) if ctx.needs_input_grad[1] \
            else None
        for start in range(0, hidden.shape[0], chunk):
            h = hidden[start:start + chunk]
            y = labels[start:start + chunk]
            logits = _chunk_logits(h, weight)
            valid = y != IGNORE_INDEX
            safe = torch.where(valid, y, 0)
            picked = logits.gather(1, safe[:, None]).squeeze(1)
            # log-sum-exp in place: one max pass, one exp pass over the chunk, no [n, vocab] temporaries
            # (torch.logsumexp allocates x - max and exponentiates it apart from the exp kept for the gradient)
            row_max = logits.amax(dim=-1, keepdim=True)
            row_max.masked_fill_(torch.isinf(row_max), 0.0)  # a row of -inf logits stays -inf, not nan
            exp = logits.sub_(row_max).exp_()
            row_sum = exp.sum(dim=-1, keepdim=True)
            lse = (row_max + row_sum.log()).squeeze(1)
            total = total + ((lse - picked) * valid).sum()
            if not needs_grad:
                continue
            # d/dlogits of the summed CE: softmax - onehot on target rows, 0 on ignored rows (in place on logits);
            # one pass normalises and zeroes the ignored rows together
            keep = valid.to(exp.dtype)[:, None]
            grad_logits = exp.mul_(keep / row_sum)
            grad_logits[torch.arange(h.shape[0], device=h.device), safe] -= keep[:, 0]
            grad_logits = grad_logits.to(h.dtype if h.dtype != torch.float64 else torch.float64)
            if grad_hidden is not None:
                grad_hidden[start:start + chunk] = grad_logits @ weight.to(grad_logits.dtype)
            if grad_weight is not None:
                grad_weight.addmm_(grad_logits.t().to(acc_dtype), h.to(acc_dtype))
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_hidden, grad_weight = ctx.saved_tensors
        gh = gw = None
        if grad_hidden is not None:
            gh = grad_hidden * grad_total.to(grad_hidden.dtype)
        if grad_weight is not None:
            gw = (grad_weight * grad_total.to(grad_weight.dtype)).to(ctx.weight_dtype)
        return gh, gw, None, None


def chunked_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                              chunk_tokens: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed token cross-entropy and the number of target tokens.

    hidden [N, D] (final-norm output), weight [vocab, D] (LM head), labels [N] with -100 = ignored;
    chunk_tokens as `model.loss_chunk_tokens` (0 = auto). Returns (loss_sum fp32 scalar (fp64 for fp64 inputs),
    n_targets int64 scalar). The caller divides by the global number of targets.
    """
    chunk = loss_chunk_size(chunk_tokens, hidden.shape[0], weight.shape[0])
    n_targets = (labels != IGNORE_INDEX).sum()
    if hidden.shape[0] == 0:
        return hidden.new_zeros((), dtype=torch.promote_types(hidden.dtype, torch.float32)), n_targets
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        # autocast would recast inside the Function's forward; the Function decides its own dtypes instead
        if torch.is_autocast_enabled(hidden.device.type):
            dtype = torch.get_autocast_dtype(hidden.device.type)
            hidden, weight = hidden.to(dtype), weight.to(dtype)
        with torch.autocast(hidden.device.type, enabled=False):
            return _FusedLinearCrossEntropy.apply(hidden, weight, labels, chunk), n_targets
    total = hidden.new_zeros((), dtype=torch.promote_types(hidden.dtype, torch.float32))
    for start in range(0, hidden.shape[0], chunk):
        logits = _chunk_logits(hidden[start:start + chunk], weight)
        total = total + F.cross_entropy(logits, labels[start:start + chunk], ignore_index=IGNORE_INDEX,
                                        reduction="sum")
    return total, n_targets
