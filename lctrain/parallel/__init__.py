"""Sequence parallelism (SP) for hybrid linear / softmax-attention models.

World = DP x SP; the ranks `[d*SP, (d+1)*SP)` form one SP group and see the same packed sample, each holding a
shard of its tokens. Mixers never touch torch.distributed: they call the functions below with the placement
found in `ctx.sp`, and every collective is issued (and its bytes counted) in `lctrain.parallel.comm`.

Training loop, once per run::

    groups = init_sp_groups(cfg.parallel.sp)            # collective; works single-process with sp = 1

per micro-batch (every rank of an SP group loads the *same* batch; DP groups load different ones)::

    local, placement = shard_batch(batch, groups.sp_rank, groups.sp_size, layout="zigzag", groups=groups,
                                   attention_mode="allgather")
    ctx = BatchContext.from_positions(local["position_ids"], sp=placement)
    logits = model(local["input_ids"], ctx)
    token_losses = F.cross_entropy(logits.flatten(0, 1), local["labels"].flatten(), ignore_index=-100,
                                   reduction="sum")
    targets = loss_normalizer(local["labels"], groups)  # target tokens over the whole DP x SP world
    loss = token_losses * groups.world_size / targets   # so that *averaging* gradients over the world is exact
    loss.backward()
    # average gradients over all DP x SP ranks: DDP on the default (world) group, or an all_reduce(AVG) of
    # every parameter's gradient over the world. Parameters are replicated across SP ranks and each rank only
    # holds its tokens' share of the gradient, so the SP ranks must be included in the average.
    metrics.update(comm_stats())                        # {"comm_bytes_linear": ..., "comm_bytes_attn": ..., ...}

Mixers (q, k, v are this rank's tokens `[B, T_local, H, D]`; `ctx.sp` is the placement, None without SP)::

    o = sp_linear_attention(q, k, v, log_decay=g, scale=s, placement=ctx.sp, backend=b)  # LASP-2
    o = sp_gated_delta_rule(q, k, v, g, beta, scale=s, placement=ctx.sp, backend=b)       # LASP-2
    o = sp_taylor_linear_attention(q, k, v, placement=ctx.sp, backend=b)                   # LASP-2, A = 1
    o = sp_attention(q, k, v, ctx.sp, mode=None, scale=s)   # mode None -> placement.attention_mode
    o = sp_local_attention(q, k, v, window, sink, s, ctx.sp, backend=b)   # halo + sink fetch
    o = sp_landmark_attention(q, k, v, block_size, s, ctx.sp)              # AllGather K/V, global blocks
    y = sp_state_passing(step, x, ctx.sp, chunk_size, initial_state, prefix)  # rank to rank ("memory")
    y = sp_memory_as_context(segment_fn, x, ctx.sp, segment_len, initial_state)  # Titans MAC, per segment
    y = sp_short_conv(conv, x, ctx.sp)                      # conv(x, position_ids, prefix=...) continues a prefix

The linear ops take document boundaries from the placement (position id 0 starts a document; `cu_seqlens`
may add more) and return outputs and gradients equal to the single-process op on the full sequence. Padding
added by `shard_batch` is its own document with labels -100; `gather_sequence` rebuilds a full sequence.
"""
from lctrain.parallel.attention import sp_attention
from lctrain.parallel.comm import comm_stats
from lctrain.parallel.groups import SPGroups, init_sp_groups, single_process_groups
from lctrain.parallel.halo import drop_halo, extend_with_halo, sp_short_conv, sp_short_conv_halo
from lctrain.parallel.lasp2 import sp_gated_delta_rule, sp_linear_attention
from lctrain.parallel.lasp2_taylor import sp_taylor_linear_attention
from lctrain.parallel.landmark_sp import sp_landmark_attention
from lctrain.parallel.local_sp import document_offsets, sp_local_attention
from lctrain.parallel.sharding import SPPlacement, gather_sequence, loss_normalizer, shard_batch
from lctrain.parallel.state_passing import sp_state_passing
from lctrain.parallel.titans_mac_sp import sp_memory_as_context

__all__ = [
    "SPGroups", "SPPlacement", "comm_stats", "document_offsets", "drop_halo", "extend_with_halo", "gather_sequence", "init_sp_groups",
    "loss_normalizer", "shard_batch", "single_process_groups", "sp_attention", "sp_gated_delta_rule",
    "sp_landmark_attention", "sp_linear_attention", "sp_local_attention", "sp_memory_as_context", "sp_short_conv",
    "sp_short_conv_halo", "sp_state_passing",
    "sp_taylor_linear_attention",
]
