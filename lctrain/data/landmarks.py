"""Landmark tokens for models with `landmark` layers (Mohtashami & Jaggi, 2023).

The landmark token gets an id of its own: the recipe extends the model's vocabulary by one
(`model.vocab_size = data.vocab_size + 1`) and the landmark is the last id, `model.vocab_size - 1`; the tokenizer
never produces it. After every `block_size - 1` real tokens of a document (positions counted from the document
start, as `position_ids` give them) one landmark is inserted, so each block of `block_size` tokens ends with its
landmark, exactly the layout `lctrain.kernels.landmark_attention` expects.

Landmarks are never predicted and never predict: their label is -100, and the token just before a landmark keeps
its original label (the next real token), so no target of the original window is lost or changed. Rows grow by
their number of landmarks and are padded to the longest row with one extra document of landmark tokens labelled
-100 (positions restart at 0 there, so no real document sees it).
"""
from __future__ import annotations

import torch

IGNORE_INDEX = -100


def landmarks_in(length: int, block_size: int) -> int:
    """Number of landmarks inserted into a document of `length` real tokens."""
    return length // (block_size - 1)


def insert_landmarks(batch: dict, landmark_id: int, block_size: int) -> dict:
    """Return a copy of `batch` (`input_ids`, `labels`, `position_ids`, int64 `[B, T]`) with landmark tokens
    inserted; the result is `[B, T']` with T' = T + the most landmarks any row received. Other keys (such as
    `cu_seqlens`, which no longer matches) are dropped: boundaries are re-derived from `position_ids`."""
    if block_size < 2:
        raise ValueError(f"insert_landmarks: block_size must be >= 2, got {block_size}")
    ids, labels, positions = batch["input_ids"], batch["labels"], batch["position_ids"]
    if bool((ids == landmark_id).any()):
        raise ValueError(f"insert_landmarks: the data already contains token id {landmark_id}, which is reserved "
                         "for landmarks; set model.vocab_size to the tokenizer's vocabulary size + 1")
    rows, length = ids.shape
    ends_block = (positions + 1) % (block_size - 1) == 0  # a landmark follows this token
    ends_long = ends_block.long()
    # Destination of every real token: its index plus the landmarks inserted before it in its row.
    destination = torch.arange(length, device=ids.device) + ends_long.cumsum(dim=1) - ends_long
    new_length = length + int(ends_long.sum(dim=1).max()) if length else 0
    out_ids = torch.full((rows, new_length), landmark_id, dtype=ids.dtype, device=ids.device)
    out_labels = torch.full((rows, new_length), IGNORE_INDEX, dtype=labels.dtype, device=ids.device)
    # Padding at the end of a row forms one extra document: positions 0, 1, 2, ... from its first token.
    used = length + ends_long.sum(dim=1, keepdim=True)
    index = torch.arange(new_length, device=ids.device).expand(rows, new_length)
    out_positions = (index - used).clamp_min(0).to(positions.dtype)
    out_ids.scatter_(1, destination, ids)
    out_labels.scatter_(1, destination, labels)
    # A real token keeps its position shifted by the landmarks before it in its document; a landmark sits one
    # place after the token it follows.
    shifted = positions + positions // (block_size - 1)
    out_positions.scatter_(1, destination, shifted)
    row_of, col_of = torch.nonzero(ends_block, as_tuple=True)
    out_positions[row_of, destination[row_of, col_of] + 1] = shifted[row_of, col_of] + 1
    return {"input_ids": out_ids, "labels": out_labels, "position_ids": out_positions}


def landmark_layout(cfg) -> tuple[int, int] | None:
    """(landmark token id, block size) for a config whose model has `landmark` layers, else None.

    The id is the last one of the model's vocabulary, which must therefore be larger than the tokenizer's
    (`model.vocab_size = data.vocab_size + 1`); raises ConfigError otherwise.
    """
    from lctrain.config import ConfigError
    from lctrain.models.mixers.registry import expand_pattern, mixer_options

    if "landmark" not in expand_pattern(cfg.model.pattern, cfg.model.n_layers):
        return None
    block_size = mixer_options(cfg.model, "landmark").get("block_size", 64)
    vocab = cfg.model.vocab_size
    if vocab <= cfg.data.vocab_size:
        raise ConfigError(f"model.vocab_size: {vocab} leaves no id for the landmark token of the landmark layers; "
                          f"set it to data.vocab_size + 1 = {cfg.data.vocab_size + 1}")
    return vocab - 1, block_size
