"""Greedy decoding through the model's own incremental path (`BatchContext.cache`).

The prompt is run once (prefill) with an empty cache; every mixer stores what it needs to continue (attention:
keys and values; linear mixers: the recurrent state and short-convolution inputs), and each new token is then a
single-position forward. That is the path a deployed model decodes with, so evaluating through it also checks it.
"""
from __future__ import annotations

import torch

from lctrain.models.context import BatchContext


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, max_new_tokens: int, stop_id: int | None = None) -> torch.Tensor:
    """Greedy continuation of `input_ids` int64 `[B, T]` (one document per row, no padding).

    `model` has the `LanguageModel` call signature: `model(ids, ctx=BatchContext, return_logits=True).logits`.
    Returns the new tokens, int64 `[B, max_new_tokens]`; after `stop_id` a row keeps repeating `stop_id`.
    """
    batch, prompt_len = input_ids.shape
    if prompt_len == 0:
        raise ValueError("generate: empty prompt")
    device = input_ids.device
    cache: dict = {}
    positions = torch.arange(prompt_len, device=device).expand(batch, prompt_len)
    logits = model(input_ids, ctx=BatchContext(positions, cache=cache), return_logits=True).logits
    out = torch.empty(batch, max_new_tokens, dtype=torch.long, device=device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    for i in range(max_new_tokens):
        token = logits[:, -1].argmax(dim=-1)
        if stop_id is not None:
            token = torch.where(finished, torch.full_like(token, stop_id), token)
            finished |= token == stop_id
        out[:, i] = token
        if i + 1 == max_new_tokens or (stop_id is not None and bool(finished.all())):
            out[:, i + 1:] = stop_id if stop_id is not None else 0
            break
        ctx = BatchContext(torch.full((batch, 1), prompt_len + i, device=device), cache=cache)
        logits = model(token[:, None], ctx=ctx, return_logits=True).logits
    return out
