"""Communication per optimizer step: the sequence-parallel bytes `lctrain.parallel.comm` counts, and the
data-parallel gradient traffic of each engine.

SP bytes follow `lctrain.parallel.comm`'s convention (bytes a rank sends plus bytes it receives, by the logical
volume of each collective) and every call the SP code makes for one forward + backward of a layer:

  attn, allgather  all_gather(cat(k, v)) forward, reduce_scatter(dK, dV) backward:      4 (W-1) |kv|
  attn, ulysses    all_to_all of q|k|v and of o forward, of dO and dq|dk|dv backward:   4 (W-1)/W (2 |q| + 2 |kv|)
  attn, ring       W-1 hops of kv forward and backward, W hops of dK/dV (compute dtype): 4 (W-1) |kv| + 2 W |dkv|
  gdn / linear     LASP-2: all_gather of the chunk summaries (A, B) forward and of dS backward (fp32 or wider):
                   2 (W-1) n_local B (|A| + |S|) + 2 (W-1) n_local B |S|  — independent of the sequence length
  conv             halo exchange of the k-1 inputs before each chunk, forward and backward, only between
                   different ranks: depends on the rank (the first rank of a contiguous layout only sends)

|kv| is this rank's K and V (`B * T_local * Hkv * 2 * head_dim` elements), T_local = T padded to a multiple of
W (contiguous) or 2W (zigzag), divided by W. With activation checkpointing each layer's forward runs twice, and so
do its forward collectives. Gradient accumulation repeats everything per micro-batch.
"""
from __future__ import annotations

import functools

from lctrain.parallel.sharding import chunk_ids_of
from lctrain.plan.candidate import Candidate, Workload

KINDS = ("linear", "attn", "conv")


def local_tokens(seq_len: int, sp: int, layout: str) -> tuple[int, int, int]:
    """(T_local, chunk size, number of chunks) as `shard_batch` pads and splits a row."""
    num_chunks = sp * (2 if layout == "zigzag" else 1)
    padded = -(-seq_len // num_chunks) * num_chunks
    chunk = padded // num_chunks
    return chunk * len(chunk_ids_of(0, sp, layout)), chunk, num_chunks


@functools.lru_cache(maxsize=4096)
def _halo_messages(sp: int, layout: str, rank: int) -> int:
    """Halo messages this SP rank sends or receives in one direction (predecessor chunk on another rank)."""
    owner = {}
    for r in range(sp):
        for chunk in chunk_ids_of(r, sp, layout):
            owner[chunk] = r
    count = 0
    for j in range(1, len(owner)):
        src, dst = owner[j - 1], owner[j]
        if src != dst and rank in (src, dst):
            count += 1
    return count


@functools.lru_cache(maxsize=65536)
def layer_bytes(layer, rows: int, seq_len: int, sp: int, layout: str, attn: str, elem: int,
                checkpointing: bool, rank: int = 0) -> dict[str, int]:
    """Bytes `lctrain.parallel.comm` counts on SP rank `rank` for one forward + backward of one layer."""
    out = dict.fromkeys(KINDS, 0)      # cached: callers must not modify the returned dict
    if sp == 1:
        return out
    w = sp
    t_local, chunk, num_chunks = local_tokens(seq_len, sp, layout)
    wide = max(elem, 4)          # compute dtype of states, summaries and ring dK/dV: at least fp32
    fwd_times = 2 if checkpointing else 1
    if layer.type == "attn":
        kv = rows * t_local * layer.kv_heads * 2 * layer.head_dim * elem
        q = rows * t_local * layer.heads * layer.head_dim * elem
        if attn == "allgather":
            fwd, bwd = 2 * (w - 1) * kv, 2 * (w - 1) * kv
        elif attn == "ulysses":
            fwd = 2 * (w - 1) * (q + kv) // w + 2 * (w - 1) * q // w
            bwd = 2 * (w - 1) * q // w + 2 * (w - 1) * (q + kv) // w
        elif attn == "ring":
            fwd = 2 * (w - 1) * kv
            bwd = 2 * (w - 1) * kv + 2 * w * (kv // elem * wide)
        else:
            raise ValueError(f"plan: attention mode must be allgather, ulysses or ring, got {attn!r}")
        out["attn"] = fwd_times * fwd + bwd
    elif layer.type in ("gdn", "linear"):
        n_local = len(chunk_ids_of(0, sp, layout))
        state = layer.heads * layer.key_dim * layer.value_dim
        decay = layer.heads * layer.key_dim * layer.key_dim if layer.type == "gdn" else layer.heads
        fwd = 2 * (w - 1) * rows * n_local * (decay + state) * wide
        bwd = 2 * (w - 1) * rows * n_local * state * wide
        out["linear"] = fwd_times * fwd + bwd
    if layer.convs:
        messages = _halo_messages(sp, layout, rank)
        per_direction = sum(rows * (k - 1) * channels * elem for channels, k in layer.convs if k > 1)
        out["conv"] = (fwd_times + 1) * messages * per_direction
    return out


def sp_bytes_per_micro_step(shape, cand: Candidate, work: Workload, rank: int = 0) -> dict[str, int]:
    """Bytes per layer type on SP rank `rank` for one micro-batch, forward and backward, all layers."""
    total = dict.fromkeys(KINDS, 0)
    for layer, count in shape.grouped():
        for kind, value in layer_bytes(layer, cand.micro_batch_size, work.seq_len, cand.sp, cand.layout, cand.attn,
                                       work.dtype_bytes, cand.activation_checkpointing, rank).items():
            total[kind] += count * value
    return total


def grad_accum(cand: Candidate, work: Workload) -> int:
    per_micro = cand.micro_batch_size * work.seq_len * cand.dp
    return max(1, work.tokens_per_step // per_micro)


def sp_bytes_per_step(shape, cand: Candidate, work: Workload, rank: int = 0) -> dict[str, int]:
    """What `metrics.jsonl` shows as `comm_bytes_<kind>` for one optimizer step on global rank `rank`."""
    accum = grad_accum(cand, work)
    return {k: v * accum for k, v in sp_bytes_per_micro_step(shape, cand, work, rank % cand.sp).items()}


def max_rank_bytes_per_micro_step(shape, cand: Candidate, work: Workload) -> dict[str, int]:
    """The busiest SP rank's bytes per kind (halo traffic differs between ranks); what the step waits for."""
    per_rank = [sp_bytes_per_micro_step(shape, cand, work, r) for r in range(min(cand.sp, 3))]
    if cand.sp > 3:  # ranks 1 .. sp-2 of a contiguous layout, and every rank but 0 of zigzag, look alike
        per_rank.append(sp_bytes_per_micro_step(shape, cand, work, cand.sp - 1))
    return {k: max(r[k] for r in per_rank) for k in KINDS}


def dp_bytes_per_step(n_params: int, block_params: int, cand: Candidate, work: Workload) -> dict[str, int]:
    """Gradient / parameter traffic per optimizer step per GPU (sent + received, as above), over all
    `world = dp x sp` ranks: SP ranks hold partial gradients of the same replica, so the average spans the world.

      ddp        one all-reduce of the fp32 gradients per step (no_sync on all but the last micro-batch)
      zero1      reduce-scatter of the gradients + all-gather of the updated bf16 parameters, per step
      zero2      reduce-scatter per micro-batch + all-gather of parameters per step
      zero3/fsdp all-gather of bf16 parameters in forward and again in backward (and again in the recomputed
                 forward with activation checkpointing), reduce-scatter of fp32 gradients, per micro-batch
    """
    n = cand.world
    if n == 1:
        return {"grad": 0, "params": 0}
    accum = grad_accum(cand, work)
    grad_elem = 4 if work.mixed_precision else work.dtype_bytes
    param_elem = work.dtype_bytes
    ring = 2 * (n - 1) / n          # all_gather / reduce_scatter of a full tensor, per byte (sent + received)
    if cand.engine == "ddp":
        grad, params = 2 * ring * n_params * grad_elem, 0
    elif cand.engine == "zero1":
        grad, params = ring * n_params * grad_elem, ring * n_params * param_elem
    elif cand.engine == "zero2":
        grad, params = accum * ring * n_params * grad_elem, ring * n_params * param_elem
    else:
        gathers = 3 if cand.activation_checkpointing else 2
        grad = accum * ring * n_params * grad_elem
        params = accum * gathers * ring * n_params * param_elem
    return {"grad": int(grad), "params": int(params)}
