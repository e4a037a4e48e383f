"""Shared by `passkey` and `niah`: greedy-decode the answer to a retrieval prompt and score it."""
from __future__ import annotations

import re

import torch

from lctrain.eval.generate import generate

_DIGITS = re.compile(r"\d+")


def first_number(text: str) -> str:
    """The first run of digits in `text` ('' if none): the model's answer to "... the pass key is"."""
    match = _DIGITS.search(text)
    return match.group(0) if match else ""


def answer_prompts(model, tokenizer, prompts: list[list[int]], answers: list[str], max_new_tokens: int,
                   batch_size: int) -> list[dict]:
    """Decode every prompt (rows of a batch must have equal length: callers group by length) and compare the first
    number in the continuation with the expected answer. Returns `{"expected", "generated", "correct"}` per prompt."""
    device = next(iter(model.parameters()), torch.empty(0)).device
    out = []
    for start in range(0, len(prompts), batch_size):
        group = prompts[start:start + batch_size]
        if len({len(p) for p in group}) != 1:
            raise ValueError("answer_prompts: prompts of one batch must have the same length")
        ids = torch.tensor(group, dtype=torch.long, device=device)
        new = generate(model, ids, max_new_tokens)
        for row, expected in zip(new.tolist(), answers[start:start + batch_size]):
            text = tokenizer.decode(row)
            out.append({"expected": expected, "generated": text, "correct": first_number(text) == expected})
    return out
