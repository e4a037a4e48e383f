"""Models rigged to know the answers, with the `LanguageModel` call signature, for scoring tests."""
from __future__ import annotations

import torch
import torch.nn as nn

from lctrain.models.lm import LMOutput


class InductionModel(nn.Module):
    """Predicts the token that followed the longest earlier match of the current suffix (an ideal induction
    head): at an MQAR query key it predicts the key's value, after "The pass key is" the key's next digit.

    Decoding through `ctx.cache` keeps the history there, like a real model's cache. `known` restricts
    what it may recall: tokens outside it get a wrong answer (the token itself), so partial knowledge can be
    scored against an independently computed expectation.
    """

    def __init__(self, vocab_size: int, known=None):
        super().__init__()
        self.vocab_size = vocab_size
        self.known = known  # callable(token id) -> bool, or None for everything
        self.anchor = nn.Parameter(torch.zeros(()))  # gives the module a device

    def forward(self, input_ids, position_ids=None, labels=None, ctx=None, return_logits=False):
        batch, length = input_ids.shape
        cache = ctx.cache if ctx is not None and ctx.cache is not None else None
        history = cache.get("ids") if cache is not None else None
        full = input_ids if history is None else torch.cat([history, input_ids], dim=1)
        if cache is not None:
            cache["ids"] = full
        start = full.shape[1] - length
        logits = torch.full((batch, length, self.vocab_size), -10.0)
        for b in range(batch):
            row = full[b].tolist()
            for t in range(start, len(row)):
                logits[b, t - start, self._predict(row, t)] = 10.0
        return LMOutput(logits=logits if return_logits else None)

    def _predict(self, row: list[int], t: int) -> int:
        best_len, best_next = 0, row[t]
        for j in range(t - 1, -1, -1):  # latest earlier position first
            n = 0
            while n <= j and row[t - n] == row[j - n]:
                n += 1
            if n > best_len:
                best_len, best_next = n, row[j + 1]
        if self.known is not None and not self.known(row[t]):
            return row[t]
        return best_next


class UniformModel(nn.Module):
    """Equal logits for every token: perplexity is exactly the vocabulary size."""

    def __init__(self, vocab_size: int):
        super().__init__()
        self.vocab_size = vocab_size
        self.anchor = nn.Parameter(torch.zeros(()))

    def forward(self, input_ids, position_ids=None, labels=None, ctx=None, return_logits=False):
        return LMOutput(logits=torch.zeros(*input_ids.shape, self.vocab_size) + self.anchor)
