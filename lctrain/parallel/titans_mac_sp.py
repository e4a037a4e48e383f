"""Titans "memory as context" (MAC) over a sequence split across SP ranks, exact wherever the shards cut.

MAC cuts every document into segments of `segment_len` tokens counted from the document start. A segment reads
the memory as it stood at the segment start, attends causally within itself (plus persistent tokens and its
readouts) and then writes itself into the memory, so segment s needs the state left by segment s-1: a strictly
sequential recurrence whose state (the memory and its momentum, or the MLP memory's weights) has no affine
summary. It is the shape `sp_state_passing` serves, with the *segment* as its chunk:

* the state handed from rank to rank is the memory at the last segment boundary before the shard boundary;
* the raw inputs after that boundary (the straddling segment's earlier tokens, at most `segment_len - 1` of
  them, possibly spanning several shards when segments are longer than shards) travel with it as the halo;
* the receiver replays `[halo | its tokens]` from that state, so every segment it touches starts at its
  single-process boundary, sees the same state and the same earlier tokens (causal attention, readouts, memory
  chunks restarting at the segment start), and produces the same outputs. The sender also finishes the
  straddling segment's tokens it owns (the work is causal, so a segment's prefix gives its tokens' outputs).

Backward replays the segments rank by rank in reverse, sending the gradients of the handed-off state and halo
back to their owner (the halo's gradient reaches the input tokens it came from), so the gradients of the input
and of every parameter used by the segment function match one process. Works for the contiguous and the zigzag
layout (chunks are processed in global order whoever owns them) and with documents crossing any number of
ranks. Point-to-point messages are counted under `kind` ("memory" by default) in `lctrain.parallel.comm`.
"""
from __future__ import annotations

from typing import Callable

import torch

from lctrain.parallel.sharding import SPPlacement
from lctrain.parallel.state_passing import sp_state_passing


def segmented(segment_fn: Callable, segment_len: int) -> Callable:
    """A stream step over consecutive segments: `step(x [N, L, D], state) -> (out [N, L, ...], state)` (L >= 1)
    runs `segment_fn` on `x[:, 0:S]`, `x[:, S:2S]`, ... (S = segment_len; the last segment may be shorter), each
    from the state the previous one left."""
    def step(x: torch.Tensor, state):
        outputs = []
        for start in range(0, x.shape[1], segment_len):
            out, state = segment_fn(x[:, start:start + segment_len], state)
            outputs.append(out)
        return torch.cat(outputs, dim=1), state
    return step


def sp_memory_as_context(segment_fn: Callable, x: torch.Tensor, placement: SPPlacement, segment_len: int,
                         initial_state: Callable, kind: str = "memory") -> torch.Tensor:
    """Run a segment recurrence over the whole sharded sequence, one document at a time; returns this rank's
    outputs `[B, T_local, ...]`.

    segment_fn: `segment_fn(segment [1, S, D], state) -> (out [1, S, ...], state after the segment)` for one
        segment of S <= segment_len tokens starting at a segment boundary (Titans' `_mac_segment`); it must be
        causal inside the segment (a token's output depends on the state and the segment's tokens up to it).
    x: `[B, T_local, D]` this rank's inputs.
    initial_state: `initial_state(like [1, 0, D])` -> the state every document starts from (may use parameters).
    Equal (outputs and gradients of x and of the parameters `segment_fn` and `initial_state` use) to running the
    segments of every whole document on one process. Collective over the SP group: every rank must call it.
    """
    if isinstance(segment_len, bool) or not isinstance(segment_len, int) or segment_len < 1:
        raise ValueError(f"sp_memory_as_context: segment_len must be a positive int, got {segment_len!r}")
    return sp_state_passing(segmented(segment_fn, segment_len), x, placement, segment_len, initial_state,
                            prefix=None, kind=kind)
