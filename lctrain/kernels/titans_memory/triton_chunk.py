"""Host side of the Triton Titans linear memory: chunk tables, kernel launches, the autograd Function, and the
list of launch configurations for the ahead-of-time compile check (`aot_specs`).

The forward walks the chunks once for the (M, S) entering each (stored), then forms every chunk's output in
parallel; the backward forms the state-free part of each chunk's error gradient in parallel, walks the chunks
once in reverse for the state gradients, then forms every input gradient in parallel. Memory: two
`[NT, H, K, V]` fp32 buffers each way, NT = number of chunks (so a small `chunk_size` on a long sequence
costs state-sized storage per chunk).
"""
from __future__ import annotations

import torch
import triton

from lctrain.kernels.titans_memory.triton_bwd import (titans_bwd_chunk_kernel, titans_bwd_local_kernel,
                                                     titans_bwd_state_kernel)
from lctrain.kernels.titans_memory.triton_config import (CHUNK_TILES, SUPPORTED_KEY_DIMS, SUPPORTED_VALUE_DIMS,
                                                         TORCH_DTYPES, launch_config)
from lctrain.kernels.titans_memory.triton_fwd import titans_fwd_output_kernel, titans_fwd_state_kernel


def new_buffer(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """Kernel output buffer, NaN-filled: an element a kernel forgot to write cannot pass for a value."""
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def chunk_tables(cu_seqlens: torch.Tensor, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """chunk_indices int32 `[NT, 2]` (sequence id, chunk number within it) and chunk_offsets int32 `[N+1]`
    (each sequence's first chunk; the last entry is NT) for packed sequences `cu_seqlens` `[N+1]`."""
    lengths = cu_seqlens[1:].long() - cu_seqlens[:-1].long()
    per_seq = (lengths + chunk_size - 1) // chunk_size
    offsets = torch.zeros(per_seq.numel() + 1, dtype=torch.long, device=cu_seqlens.device)
    offsets[1:] = per_seq.cumsum(0)
    seq_ids = torch.repeat_interleave(torch.arange(per_seq.numel(), device=cu_seqlens.device), per_seq)
    local = torch.arange(seq_ids.numel(), device=cu_seqlens.device) - offsets[seq_ids]
    return torch.stack([seq_ids, local], dim=1).to(torch.int32).contiguous(), offsets.to(torch.int32)


class TitansLinearMemoryFunction(torch.autograd.Function):
    """Flat packed tensors: q, k `[T, H, K]`, v `[T, H, V]`, alpha, eta, theta `[T, H]`, initial (M, S)
    `[N, H, K, V]` or None, cu_seqlens int32 `[N+1]`. Returns o `[T, H, V]` (q's dtype) and the final
    M, S `[N, H, K, V]` fp32."""

    @staticmethod
    def forward(ctx, q, k, v, alpha, eta, theta, initial_memory, initial_momentum, chunk_size, cu_seqlens,
                cu_seqlens_cpu=None):
        q, k, v = (x.contiguous() for x in (q, k, v))
        alpha, eta, theta = (x.to(torch.float32).contiguous() for x in (alpha, eta, theta))
        has_initial = initial_memory is not None
        if has_initial:
            initial_memory = initial_memory.to(torch.float32).contiguous()
            initial_momentum = initial_momentum.to(torch.float32).contiguous()
        total, heads, key_dim = q.shape
        value_dim = v.shape[-1]
        num_seqs = cu_seqlens.numel() - 1
        cfg = launch_config(key_dim, value_dim, chunk_size, TORCH_DTYPES[q.dtype])
        host = cu_seqlens.cpu() if cu_seqlens_cpu is None else cu_seqlens_cpu  # tables built on the host
        chunk_indices, chunk_offsets = (t.to(q.device, non_blocking=True) for t in chunk_tables(host, chunk_size))
        num_chunks = chunk_indices.shape[0]
        f32 = {"dtype": torch.float32, "device": q.device}
        o = new_buffer((total, heads, value_dim), q.dtype, q.device)
        chunk_memory = new_buffer((num_chunks, heads, key_dim, value_dim), **f32)
        chunk_momentum = new_buffer((num_chunks, heads, key_dim, value_dim), **f32)
        final_memory = new_buffer((num_seqs, heads, key_dim, value_dim), **f32)
        final_momentum = new_buffer((num_seqs, heads, key_dim, value_dim), **f32)
        num_v_blocks = triton.cdiv(value_dim, cfg.value_block)
        titans_fwd_state_kernel[(num_seqs * heads, num_v_blocks)](
            k, v, alpha, eta, theta, initial_memory, initial_momentum, chunk_memory, chunk_momentum,
            final_memory, final_momentum, cu_seqlens, chunk_offsets, chunk_size, heads, key_dim, value_dim,
            BT=cfg.chunk_tile, BK=cfg.key_block, BV=cfg.value_block, HAS_INITIAL=has_initial,
            PRECISION=cfg.precision, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        if num_chunks:
            titans_fwd_output_kernel[(num_chunks, heads, num_v_blocks)](
                q, k, v, alpha, eta, theta, chunk_memory, chunk_momentum, o, cu_seqlens, chunk_indices,
                chunk_size, heads, key_dim, value_dim, BT=cfg.chunk_tile, BK=cfg.inner_key_block,
                BV=cfg.value_block, PRECISION=cfg.chunk_precision, num_warps=cfg.chunk_warps, num_stages=cfg.num_stages)
        ctx.save_for_backward(q, k, v, alpha, eta, theta, chunk_memory, chunk_momentum, cu_seqlens,
                              chunk_indices, chunk_offsets)
        ctx.cfg, ctx.chunk_size, ctx.has_initial = cfg, chunk_size, has_initial
        return o, final_memory, final_momentum

    @staticmethod
    def backward(ctx, d_out, d_final_memory, d_final_momentum):
        (q, k, v, alpha, eta, theta, chunk_memory, chunk_momentum, cu_seqlens, chunk_indices,
         chunk_offsets) = ctx.saved_tensors
        cfg, chunk_size = ctx.cfg, ctx.chunk_size
        total, heads, key_dim = q.shape
        value_dim = v.shape[-1]
        num_seqs = cu_seqlens.numel() - 1
        num_chunks = chunk_indices.shape[0]
        num_v_blocks = triton.cdiv(value_dim, cfg.value_block)
        f32 = {"dtype": torch.float32, "device": q.device}
        state_shape = (num_seqs, heads, key_dim, value_dim)
        d_out = torch.zeros_like(v) if d_out is None else d_out.contiguous()
        d_final_memory, d_final_momentum = (torch.zeros(state_shape, **f32) if d is None
                                            else d.to(torch.float32).contiguous()
                                            for d in (d_final_memory, d_final_momentum))
        chunk_d_memory = new_buffer(chunk_memory.shape, **f32)
        chunk_d_momentum = new_buffer(chunk_memory.shape, **f32)
        d_initial_memory = new_buffer(state_shape, **f32)
        d_initial_momentum = new_buffer(state_shape, **f32)
        d_error_local = new_buffer((total, heads, value_dim), **f32)
        if num_chunks:
            titans_bwd_local_kernel[(num_chunks, heads, num_v_blocks)](
                q, k, alpha, eta, theta, d_out, d_error_local, cu_seqlens, chunk_indices, chunk_size, heads,
                key_dim, value_dim, BT=cfg.chunk_tile, BK=cfg.inner_key_block, BV=cfg.value_block,
                PRECISION=cfg.chunk_precision, num_warps=cfg.chunk_warps, num_stages=cfg.num_stages)
        titans_bwd_state_kernel[(num_seqs * heads, num_v_blocks)](
            q, k, alpha, eta, theta, d_out, d_error_local, d_final_memory, d_final_momentum, chunk_d_memory,
            chunk_d_momentum, d_initial_memory, d_initial_momentum, cu_seqlens, chunk_offsets, chunk_size, heads,
            key_dim, value_dim, BT=cfg.chunk_tile, BK=cfg.key_block, BV=cfg.value_block, PRECISION=cfg.precision,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        dq_part = new_buffer((num_v_blocks, total, heads, key_dim), **f32)
        dk_part = new_buffer((num_v_blocks, total, heads, key_dim), **f32)
        dv = new_buffer((total, heads, value_dim), **f32)
        gate_parts = [new_buffer((num_v_blocks, total, heads), **f32) for _ in range(3)]
        if num_chunks:
            titans_bwd_chunk_kernel[(num_chunks, heads, num_v_blocks)](
                q, k, v, alpha, eta, theta, d_out, chunk_memory, chunk_momentum, chunk_d_memory,
                chunk_d_momentum, dq_part, dk_part, dv, *gate_parts, cu_seqlens, chunk_indices, chunk_size,
                total, heads, key_dim, value_dim, BT=cfg.chunk_tile, BK=cfg.inner_key_block,
                BV=cfg.value_block, PRECISION=cfg.chunk_precision, num_warps=cfg.chunk_warps, num_stages=cfg.num_stages)
        d_alpha, d_eta, d_theta = (part.sum(0) for part in gate_parts)
        d_initial = (d_initial_memory, d_initial_momentum) if ctx.has_initial else (None, None)
        return (dq_part.sum(0).to(q.dtype), dk_part.sum(0).to(k.dtype), dv.to(v.dtype), d_alpha, d_eta, d_theta,
                *d_initial, None, None, None)


def triton_titans_linear_memory(q, k, v, alpha, eta, theta, chunk_size, initial_state=None,
                                output_final_state=False, cu_seqlens=None, cu_seqlens_cpu=None):
    """Triton Titans linear memory on `[B, T, H, D]` inputs (validated; shapes as in `titans_linear_memory`).

    Returns o `[B, T, H, V]` in q's dtype and the final `(M, S)` (fp32, `[N, H, K, V]`) or None.
    """
    batch, length, heads, key_dim = q.shape
    value_dim = v.shape[-1]
    if cu_seqlens is None:
        cu_seqlens_cpu = torch.arange(0, batch + 1, dtype=torch.int32) * length
        cu_seqlens = cu_seqlens_cpu.to(q.device, non_blocking=True)
    else:
        cu_seqlens = cu_seqlens.to(device=q.device, dtype=torch.int32).contiguous()
    flat = batch * length
    initial_memory, initial_momentum = (None, None) if initial_state is None else initial_state
    o, memory, momentum = TitansLinearMemoryFunction.apply(
        q.reshape(flat, heads, key_dim), k.reshape(flat, heads, key_dim), v.reshape(flat, heads, value_dim),
        alpha.reshape(flat, heads), eta.reshape(flat, heads), theta.reshape(flat, heads),
        initial_memory, initial_momentum, chunk_size, cu_seqlens, cu_seqlens_cpu)
    return o.reshape(batch, length, heads, value_dim), ((memory, momentum) if output_final_state else None)


_ELEMENT_ARGS = {"q", "k", "v", "o", "d_out"}  # typed like q/k/v; every other pointer is fp32 or int32
_INDEX_ARGS = {"cu_seqlens", "chunk_offsets", "chunk_indices"}
_INT_ARGS = {"chunk_size", "total_tokens", "H", "K", "V"}


def _signature(kernel, constexprs: dict, dtype: str) -> dict:
    sig = {}
    for name in kernel.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in _INT_ARGS:
            sig[name] = "i32"
        elif name in _INDEX_ARGS:
            sig[name] = "*i32"
        else:
            sig[name] = f"*{dtype}" if name in _ELEMENT_ARGS else "*fp32"
    return sig


def aot_specs(dtype: str, head_dims=None, chunk_sizes=CHUNK_TILES) -> list:
    """Every launch configuration of this module's kernels for q/k/v element type `dtype` ("bf16"/"fp32").

    One entry per distinct block shape over the supported head dims (or `head_dims`, a list of (K, V)) and
    chunk tiles (every chunk_size rounds up to one of `CHUNK_TILES`). The optional initial state is compiled
    switched on. Consumed by `lctrain.kernels.aot`.
    """
    from lctrain.kernels.aot import AotSpec, divisibility_attrs  # lazy: aot imports this module by name

    if head_dims is None:
        head_dims = [(kd, vd) for kd in SUPPORTED_KEY_DIMS for vd in SUPPORTED_VALUE_DIMS]
    variants = {}
    for key_dim, value_dim in head_dims:
        for chunk in chunk_sizes:
            cfg = launch_config(key_dim, value_dim, chunk, dtype)
            walk = {"BT": cfg.chunk_tile, "BK": cfg.key_block, "BV": cfg.value_block, "PRECISION": cfg.precision}
            per_chunk = {"BT": cfg.chunk_tile, "BK": cfg.inner_key_block, "BV": cfg.value_block,
                         "PRECISION": cfg.chunk_precision}
            launches = [
                (titans_fwd_state_kernel, {**walk, "HAS_INITIAL": True}, cfg.num_warps),
                (titans_fwd_output_kernel, per_chunk, cfg.chunk_warps),
                (titans_bwd_local_kernel, per_chunk, cfg.chunk_warps),
                (titans_bwd_state_kernel, walk, cfg.num_warps),
                (titans_bwd_chunk_kernel, per_chunk, cfg.chunk_warps),
            ]
            for kernel, constexprs, warps in launches:
                shape = ",".join(f"{key}={constexprs[key]}" for key in ("BT", "BK", "BV"))
                label = f"{kernel.__name__}[{shape},{constexprs['PRECISION']},warps={warps},stages={cfg.num_stages}]"
                variants.setdefault(label, (kernel, constexprs, warps, cfg.num_stages))
    specs = []
    for label, (kernel, constexprs, warps, stages) in variants.items():
        sig = _signature(kernel, constexprs, dtype)
        specs.append(AotSpec(kernel, sig, constexprs, warps, stages, label,
                             divisibility_attrs(kernel, sig, ints=("K", "V"))))
    return specs
