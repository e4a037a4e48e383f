"""`ppl`: perplexity of a token stream at one or several context lengths, by sliding windows.

The documents are tokenised and laid end to end as `[BOS] doc [EOS] [BOS] doc [EOS] ...` (the training
framing). For context length L and stride S <= L, windows of L tokens start every S tokens; the first window scores
all its targets and each later one only its last S targets, so every token of the stream after the first is scored
exactly once and, except in the first window, with at least L - S tokens of context. S = L - 1 gives windows that
share one token (fast; S = L is taken as L - 1); smaller S gives every scored token more context, which is what
measures a model beyond its training length fairly. The last window is aligned to the end of the stream so the
tail is not dropped.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from tqdm.auto import tqdm

from lctrain.config import ConfigError


def read_documents(path: str | Path) -> list[str]:
    """Documents of a local `.txt`/`.md` file (one document) or `.jsonl` file (the `text` field of each line)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"eval --data: file not found: {path}")
    if path.suffix in (".jsonl", ".json"):
        docs = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"eval --data: {path} line {number} is not JSON ({exc.msg})") from None
            text = row.get("text") if isinstance(row, dict) else None
            if not isinstance(text, str):
                raise ConfigError(f"eval --data: {path} line {number} has no string field 'text'")
            if text:
                docs.append(text)
        return docs
    return [path.read_text(encoding="utf-8", errors="replace")]


def frame_documents(token_docs, bos_id: int, eos_id: int) -> torch.Tensor:
    """int64 `[N]`: the documents framed as in training and concatenated."""
    pieces = []
    for ids in token_docs:
        pieces.append(torch.tensor([bos_id, *[int(i) for i in ids], eos_id], dtype=torch.long))
    return torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long)


def window_starts(n_tokens: int, length: int, stride: int) -> list[tuple[int, int]]:
    """(start, index inside the window of its first scored token) for every window; see the module docstring.

    A scored token needs at least one token of context inside its window, so a stride of L acts as L - 1.
    """
    if n_tokens <= length:
        return [(0, 1)]
    stride = min(stride, length - 1)
    out, start, scored_until = [], 0, 1  # scored_until: stream index of the next token not yet scored
    while True:
        end = min(start + length, n_tokens)
        start = end - length
        out.append((start, scored_until - start))
        scored_until = end
        if end == n_tokens:
            return out
        start += stride


@torch.no_grad()
def perplexity(model, stream: torch.Tensor, length: int, stride: int | None = None, progress: bool = True,
               desc: str = "ppl") -> dict:
    """`{"length", "stride", "loss", "ppl", "tokens"}` for `stream` int64 `[N]` (N >= 2).

    A target token `stream[i]` (i >= 1) is predicted from `stream[start:i]`: each window is one sequence to the
    model (positions count from its start and it attends across document boundaries), since measuring long
    context is the point; evaluate on long documents.
    """
    stride = stride or length
    if not 0 < stride <= length:
        raise ConfigError(f"eval --stride: {stride} is not allowed; expected 1 <= stride <= length {length}")
    if stream.numel() < 2:
        raise ConfigError("eval --data: fewer than 2 tokens to score")
    device = next(iter(model.parameters()), torch.empty(0)).device
    total_loss, total_tokens = 0.0, 0
    windows = window_starts(stream.numel(), length, stride)
    for start, first in tqdm(windows, desc=desc, unit="win", disable=not progress):
        ids = stream[start:start + length].to(device)[None]
        logits = model(ids, return_logits=True).logits[0, :-1].float()  # predicts ids[1:]
        targets = ids[0, 1:]
        skip = first - 1  # window token `first` is the first scored one, predicted by logit first - 1
        losses = torch.nn.functional.cross_entropy(logits[skip:], targets[skip:], reduction="sum")
        total_loss += float(losses)
        total_tokens += targets.numel() - skip
    loss = total_loss / total_tokens
    return {"length": length, "stride": stride, "loss": loss, "ppl": math.exp(min(loss, 50.0)),
            "tokens": total_tokens}
