"""The launch grid of every Triton kernel, as a function of the problem size alone (no tensors, no GPU).

Mirrors the launchers (`triton_chunk.py`, `triton_local.py`, `triton_blocks.py`); a test records the grids the
launchers really use in the Triton interpreter and checks they equal these, and another evaluates these at
sizes no CPU can run (T = 4M tokens, H = 64) against CUDA's grid limits.
"""
from __future__ import annotations

import triton

# CUDA: grid axis 0 up to 2^31 - 1 blocks, axes 1 and 2 up to 65,535.
GRID_LIMITS = (2**31 - 1, 65535, 65535)


def _chunks(lengths, chunk: int) -> int:
    return sum((n + chunk - 1) // chunk for n in lengths)  # sum of cdiv(n, chunk), fast for 10^5 documents


def launch_grids(op: str, lengths: list[int], heads: int, key_dim: int, value_dim: int, dtype: str = "bf16",
                 **options) -> dict[str, tuple[int, ...]]:
    """`{kernel name: grid}` of the forward and backward launches of `op` for documents of `lengths` tokens
    (N = len(lengths)). options: `chunk_size` (titans), `block_size` (landmark), `decay` (linear: the
    log-decay gradient kernel runs)."""
    num_seqs, max_len = len(lengths), max(lengths, default=0)
    if op == "gated_delta_rule":
        from lctrain.kernels.gated_delta_rule.triton_config import launch_config

        cfg = launch_config(key_dim, value_dim, dtype)
        nc = _chunks(lengths, cfg.chunk)
        state = (num_seqs * heads, triton.cdiv(value_dim, cfg.state_value_block))
        per_chunk = (nc, heads)
        grids = {"gdn_fwd_state_kernel": state, "gdn_bwd_state_kernel": state}
        if nc:
            grids.update({name: per_chunk for name in (
                "gdn_fwd_inverse_kernel", "gdn_fwd_wu_kernel", "gdn_bwd_dv_kernel", "gdn_bwd_dq_kernel",
                "gdn_bwd_dk_kernel", "gdn_bwd_dw_kernel", "gdn_bwd_wy_kernel")})
            grids["gdn_fwd_output_kernel"] = (nc, triton.cdiv(value_dim, cfg.value_block), heads)
        return grids
    if op == "linear_attention":
        from lctrain.kernels.linear_attention.triton_config import launch_config

        fwd = launch_config(key_dim, value_dim, dtype, "fwd")
        bwd = launch_config(key_dim, value_dim, dtype, "bwd_dq")
        blocks = lambda c: triton.cdiv(key_dim, c.block_k) * triton.cdiv(value_dim, c.block_v)  # noqa: E731
        grids = {"linear_attention_fwd_kernel": (num_seqs * heads, blocks(fwd)),
                 "linear_attention_bwd_dq_kernel": (num_seqs * heads, blocks(bwd)),
                 "linear_attention_bwd_dkv_kernel": (num_seqs * heads, blocks(bwd))}
        if options.get("decay", True):
            grids["linear_attention_dlog_decay_kernel"] = (num_seqs * heads,)
        return grids
    if op == "local_attention":
        from lctrain.kernels.local_attention.triton_config import launch_config

        cfgs = {kind: launch_config(key_dim, value_dim, kind) for kind in ("fwd", "bwd_dq", "bwd_dkv")}
        if not max_len:
            return {}  # nothing to attend: no launch
        # axis 0: one program per tile of every document (the tile table), axis 1: heads
        return {"local_attention_fwd_kernel": (_chunks(lengths, cfgs["fwd"].block_m), heads),
                "local_attention_bwd_dq_kernel": (_chunks(lengths, cfgs["bwd_dq"].block_m), heads),
                "local_attention_bwd_dkv_kernel": (_chunks(lengths, cfgs["bwd_dkv"].block_n), heads)}
    if op == "landmark_attention":
        from lctrain.kernels.landmark_attention.triton_config import launch_config, padded_dim

        block = options["block_size"]
        width = padded_dim(max(key_dim, value_dim))
        cfgs = {kind: launch_config(width, width, block, kind) for kind in ("fwd", "bwd_dq")}
        if not max_len:
            return {}
        # axis 0: the tile table (query tiles, or landmark blocks, of every document), axis 1: heads
        blocks = _chunks(lengths, block)
        return {"landmark_fwd_kernel": (blocks * triton.cdiv(block, cfgs["fwd"].block_m), heads),
                "landmark_bwd_dq_kernel": (blocks * triton.cdiv(block, cfgs["bwd_dq"].block_m), heads),
                "landmark_bwd_dkv_kernel": (blocks, heads)}
    if op == "taylor_linear_attention":
        from lctrain.kernels.taylor_linear_attention.triton_chunk import launch_config

        fwd, bwd = launch_config(key_dim, "fwd"), launch_config(key_dim, "bwd_dq")
        back = (num_seqs * heads, triton.cdiv(value_dim + 1, bwd.block_v))
        return {"taylor_fwd_kernel": (num_seqs * heads, triton.cdiv(value_dim + 1, fwd.block_v)),
                "taylor_bwd_dq_kernel": back, "taylor_bwd_dkv_kernel": back}
    if op == "titans_linear_memory":
        from lctrain.kernels.titans_memory.triton_config import launch_config

        chunk_size = options["chunk_size"]
        cfg = launch_config(key_dim, value_dim, chunk_size, dtype)
        nc = _chunks(lengths, chunk_size)
        nv = triton.cdiv(value_dim, cfg.value_block)
        grids = {"titans_fwd_state_kernel": (num_seqs * heads, nv), "titans_bwd_state_kernel": (num_seqs * heads, nv)}
        if nc:
            grids.update({name: (nc, heads, nv) for name in (
                "titans_fwd_output_kernel", "titans_bwd_local_kernel", "titans_bwd_chunk_kernel")})
        return grids
    raise ValueError(f"launch_grids: unknown op {op!r}")


def grid_violations(grids: dict[str, tuple[int, ...]]) -> list[str]:
    """Kernels whose grid passes a CUDA limit, as readable lines (empty when all fit)."""
    bad = []
    for name, grid in grids.items():
        for axis, (size, limit) in enumerate(zip(grid, GRID_LIMITS)):
            if size > limit:
                bad.append(f"{name}: grid axis {axis} = {size:,} > {limit:,}")
    return bad
