"""Host side of the Triton Gated DeltaNet: chunk tables, kernel launches, the autograd Function, and the
list of launch configurations for the ahead-of-time compile check (`aot_specs`).

The forward saves the per-chunk tensors the backward needs (cumulative gates, A, Aqk, W, delta and every
chunk's entering state), so the backward recomputes nothing but walks the chunks once more in reverse. All of
them but the gates are stored in q's element type: bf16 inputs keep bf16 states (K V / C elements per token and
head, half the fp32 bytes), and the kernels feed them to bf16 tensor-core products with fp32 accumulation.
"""
from __future__ import annotations

import torch
import triton

from lctrain.kernels.gated_delta_rule.triton_bwd import (gdn_bwd_dk_kernel, gdn_bwd_dq_kernel, gdn_bwd_dv_kernel,
                                                         gdn_bwd_dw_kernel, gdn_bwd_state_kernel, gdn_bwd_wy_kernel)
from lctrain.kernels.gated_delta_rule.triton_config import (SUPPORTED_KEY_DIMS, SUPPORTED_VALUE_DIMS, TORCH_DTYPES,
                                                            launch_config)
from lctrain.kernels.gated_delta_rule.triton_fwd import (gdn_fwd_inverse_kernel, gdn_fwd_output_kernel,
                                                         gdn_fwd_state_kernel, gdn_fwd_wu_kernel)


def new_buffer(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """Uninitialised tensor for a kernel to fill; every buffer goes through here so tests can poison them."""
    return torch.empty(shape, dtype=dtype, device=device)


def chunk_tables(cu_seqlens: torch.Tensor, chunk: int):
    """Chunk bookkeeping for packed sequences.

    Args:
        cu_seqlens: int `[N+1]` token offsets.
    Returns:
        chunk_indices int32 `[NT, 2]` (sequence id, chunk number within it) and chunk_offsets int32 `[N+1]`
        (index of each sequence's first chunk; the last entry is NT).
    """
    lengths = cu_seqlens[1:].long() - cu_seqlens[:-1].long()
    per_seq = (lengths + chunk - 1) // chunk
    offsets = torch.zeros(per_seq.numel() + 1, dtype=torch.long, device=cu_seqlens.device)
    offsets[1:] = per_seq.cumsum(0)
    seq_ids = torch.repeat_interleave(torch.arange(per_seq.numel(), device=cu_seqlens.device), per_seq)
    local = torch.arange(seq_ids.numel(), device=cu_seqlens.device) - offsets[seq_ids]
    indices = torch.stack([seq_ids, local], dim=1).to(torch.int32).contiguous()
    return indices, offsets.to(torch.int32)


def _forward(q, k, v, g, beta, scale, initial_state, store_final, cu_seqlens, cfg, cu_seqlens_cpu=None):
    """Flat inputs: q, k `[T, H, K]`, v `[T, H, V]` (one dtype E), g, beta `[T, H]` fp32, cu_seqlens int32
    `[N+1]` (and its host copy, from which the chunk tables are built without reading the device).

    Returns o `[T, H, V]` (E), the final state `[N, H, K, V]` fp32 or None, and the saved tensors (cum_gate
    fp32, the rest in E).
    """
    total, heads, key_dim = k.shape
    value_dim = v.shape[-1]
    num_seqs = cu_seqlens.numel() - 1
    if cu_seqlens_cpu is None:
        cu_seqlens_cpu = cu_seqlens.cpu()
    chunk_indices, chunk_offsets = (t.to(q.device, non_blocking=True)
                                    for t in chunk_tables(cu_seqlens_cpu, cfg.chunk))
    num_chunks = chunk_indices.shape[0]
    f32 = {"dtype": torch.float32, "device": q.device}
    elem = {"dtype": q.dtype, "device": q.device}
    cum_gate = new_buffer((total, heads), **f32)
    a_inv = new_buffer((total, heads, cfg.chunk), **elem)
    a_qk = new_buffer((total, heads, cfg.chunk), **elem)
    w = new_buffer((total, heads, key_dim), **elem)
    u = new_buffer((total, heads, value_dim), **elem)
    if num_chunks:
        gdn_fwd_inverse_kernel[(num_chunks, heads)](
            q, k, g, beta, cum_gate, a_inv, a_qk, cu_seqlens, chunk_indices, scale, heads, key_dim,
            BT=cfg.chunk, BK=cfg.key_block, PRECISION=cfg.precision, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        gdn_fwd_wu_kernel[(num_chunks, heads)](
            k, v, beta, cum_gate, a_inv, w, u, cu_seqlens, chunk_indices, heads, key_dim, value_dim,
            BT=cfg.chunk, BK=cfg.key_block, BV=cfg.value_block, PRECISION=cfg.precision,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    chunk_states = new_buffer((num_chunks, heads, key_dim, value_dim), **elem)
    delta = new_buffer((total, heads, value_dim), **elem)
    final_state = new_buffer((num_seqs, heads, key_dim, value_dim), **f32) if store_final else None
    gdn_fwd_state_kernel[(num_seqs * heads, triton.cdiv(value_dim, cfg.state_value_block))](
        k, w, u, cum_gate, initial_state, chunk_states, delta, final_state, cu_seqlens, chunk_offsets, heads,
        key_dim, value_dim, BT=cfg.chunk, BK=cfg.state_key_block, BV=cfg.state_value_block,
        HAS_INITIAL=initial_state is not None, STORE_FINAL=store_final, PRECISION=cfg.precision,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    o = new_buffer((total, heads, value_dim), dtype=q.dtype, device=q.device)
    if num_chunks:
        gdn_fwd_output_kernel[(num_chunks, triton.cdiv(value_dim, cfg.value_block), heads)](
            q, cum_gate, a_qk, delta, chunk_states, o, cu_seqlens, chunk_indices, scale, heads,
            key_dim, value_dim, BT=cfg.chunk, BK=cfg.key_block, BV=cfg.value_block,
            PRECISION=cfg.precision, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    saved = (cum_gate, a_inv, a_qk, w, delta, chunk_states, chunk_indices, chunk_offsets)
    return o, final_state, saved


def _backward(q, k, v, beta, scale, saved, d_out, d_final, want_d_initial, cu_seqlens, cfg):
    """Gradients (dq, dk, dv, dg, dbeta, d_initial_state or None), flat layout as in `_forward`; dg and dbeta
    fp32 (autograd casts them to the inputs' dtypes)."""
    cum_gate, a_inv, a_qk, w, delta, chunk_states, chunk_indices, chunk_offsets = saved
    total, heads, key_dim = k.shape
    value_dim = v.shape[-1]
    num_seqs = cu_seqlens.numel() - 1
    num_chunks = chunk_indices.shape[0]
    f32 = {"dtype": torch.float32, "device": q.device}
    elem = {"dtype": q.dtype, "device": q.device}
    chunk_grads = new_buffer(chunk_states.shape, **elem)
    d_delta = new_buffer((total, heads, value_dim), **elem)
    d_initial = new_buffer((num_seqs, heads, key_dim, value_dim), **f32) if want_d_initial else None
    gdn_bwd_state_kernel[(num_seqs * heads, triton.cdiv(value_dim, cfg.state_value_block))](
        q, k, w, cum_gate, a_qk, d_out, d_final, chunk_grads, d_delta, d_initial, cu_seqlens, chunk_offsets,
        scale, heads, key_dim, value_dim, BT=cfg.chunk, BK=cfg.state_key_block,
        BV=cfg.state_value_block, HAS_D_FINAL=d_final is not None, STORE_D_INITIAL=want_d_initial,
        PRECISION=cfg.precision, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    dq = new_buffer(q.shape, dtype=q.dtype, device=q.device)
    dv = new_buffer(v.shape, dtype=v.dtype, device=v.device)
    dk_part = new_buffer((total, heads, key_dim), **f32)
    d_beta_part = new_buffer((total, heads), **f32)
    d_gate_part = new_buffer((total, heads), **f32)
    d_a = new_buffer((total, heads, cfg.chunk), **f32)
    d_qk = new_buffer((total, heads, cfg.chunk), **elem)
    dk = new_buffer(k.shape, dtype=k.dtype, device=k.device)
    d_beta = new_buffer((total, heads), **f32)
    dg = new_buffer((total, heads), **f32)
    if num_chunks:
        grid = (num_chunks, heads)
        per_chunk = {"BT": cfg.chunk, "PRECISION": cfg.precision, "num_warps": cfg.num_warps,
                     "num_stages": cfg.num_stages}
        gdn_bwd_dv_kernel[grid](
            v, beta, cum_gate, a_inv, a_qk, delta, d_out, d_delta, dv, d_qk, d_beta_part, d_gate_part, d_a,
            cu_seqlens, chunk_indices, scale, heads, value_dim, BV=cfg.intra_value_block, **per_chunk)
        gdn_bwd_dq_kernel[grid](
            q, k, cum_gate, chunk_states, d_out, d_qk, dq, d_gate_part, cu_seqlens, chunk_indices, scale, heads,
            key_dim, value_dim, BK=cfg.intra_key_block, BV=cfg.intra_value_block, **per_chunk)
        gdn_bwd_dk_kernel[grid](
            q, k, cum_gate, delta, chunk_states, chunk_grads, d_qk, dk_part, d_gate_part, cu_seqlens,
            chunk_indices, heads, key_dim, value_dim, BK=cfg.intra_key_block, BV=cfg.intra_value_block,
            **per_chunk)
        gdn_bwd_dw_kernel[grid](
            k, beta, cum_gate, a_inv, chunk_states, d_delta, dk_part, d_beta_part, d_gate_part, d_a, cu_seqlens,
            chunk_indices, heads, key_dim, value_dim, BK=cfg.intra_key_block, BV=cfg.intra_value_block,
            **per_chunk)
        gdn_bwd_wy_kernel[(num_chunks, heads)](
            k, beta, cum_gate, a_inv, d_a, dk_part, d_beta_part, d_gate_part, dk, d_beta, dg, cu_seqlens,
            chunk_indices, heads, key_dim, BT=cfg.chunk, BK=cfg.key_block, PRECISION=cfg.precision,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return dq, dk, dv, dg, d_beta, d_initial


class GatedDeltaRuleFunction(torch.autograd.Function):
    """Triton chunked Gated DeltaNet on flat packed tensors (see `_forward` for shapes)."""

    @staticmethod
    def forward(ctx, q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens, cu_seqlens_cpu=None):
        q, k, v = (x.contiguous() for x in (q, k, v))
        # Gates and write strengths are [T, H]: fp32 costs nothing and keeps one kernel variant per q dtype.
        g, beta = (x.to(torch.float32).contiguous() for x in (g, beta))
        if initial_state is not None:
            initial_state = initial_state.to(torch.float32).contiguous()
        cfg = launch_config(k.shape[-1], v.shape[-1], TORCH_DTYPES[q.dtype])
        o, final_state, saved = _forward(q, k, v, g, beta, scale, initial_state, output_final_state,
                                         cu_seqlens, cfg, cu_seqlens_cpu)
        ctx.save_for_backward(q, k, v, beta, cu_seqlens, *saved)
        ctx.scale, ctx.cfg = scale, cfg
        ctx.has_initial = initial_state is not None
        return o, final_state

    @staticmethod
    def backward(ctx, d_out, d_final):
        q, k, v, beta, cu_seqlens, *saved = ctx.saved_tensors
        d_out = d_out.to(q.dtype).contiguous()  # a product operand beside q-typed tiles
        if d_final is not None:
            d_final = d_final.to(torch.float32).contiguous()
        dq, dk, dv, dg, d_beta, d_initial = _backward(q, k, v, beta, ctx.scale, saved, d_out, d_final,
                                                      ctx.has_initial, cu_seqlens, ctx.cfg)
        return dq, dk, dv, dg, d_beta, None, d_initial, None, None, None


def triton_gated_delta_rule(q, k, v, g, beta, scale, initial_state=None, output_final_state=False,
                            cu_seqlens=None, cu_seqlens_cpu=None):
    """Triton Gated DeltaNet on `[B, T, H, D]` inputs (shapes as in `lctrain.kernels.gated_delta_rule`).

    Returns o `[B, T, H, V]` in q's dtype and the final state `[N, H, K, V]` fp32 or None.
    """
    batch, seq_len, heads, key_dim = k.shape
    value_dim = v.shape[-1]
    if cu_seqlens is None:
        cu_seqlens_cpu = torch.arange(0, batch + 1, dtype=torch.int32) * seq_len
        cu_seqlens = cu_seqlens_cpu.to(q.device, non_blocking=True)
    else:
        cu_seqlens = cu_seqlens.to(device=q.device, dtype=torch.int32)
    flat = batch * seq_len
    o, final_state = GatedDeltaRuleFunction.apply(
        q.reshape(flat, heads, key_dim), k.reshape(flat, heads, key_dim), v.reshape(flat, heads, value_dim),
        g.reshape(flat, heads), beta.reshape(flat, heads), scale, initial_state, output_final_state, cu_seqlens,
        cu_seqlens_cpu)
    return o.reshape(batch, seq_len, heads, value_dim), final_state


# Arguments typed like q/k/v: the inputs, their gradients and the per-chunk tensors stored in the input type;
# every other pointer (g and beta included, which the Function converts to fp32, the states at the sequence
# ends and the accumulated gradient shares) is fp32 or int32 bookkeeping.
_ELEMENT_ARGS = {"q", "k", "v", "o", "d_out", "dq", "dk", "dv", "a_inv", "a_qk", "w", "u", "delta", "chunk_states",
                 "chunk_grads", "d_delta", "d_qk"}
_INDEX_ARGS = {"cu_seqlens", "chunk_indices", "chunk_offsets"}
_INT_ARGS = {"H", "K", "V"}


def _signature(kernel, constexprs: dict, dtype: str) -> dict:
    """`{arg: triton type}` for a kernel launched by this module with q/k/v element type `dtype`."""
    sig = {}
    for name in kernel.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name == "scale":
            sig[name] = "fp32"
        elif name in _INT_ARGS:
            sig[name] = "i32"
        elif name in _INDEX_ARGS:
            sig[name] = "*i32"
        else:
            sig[name] = f"*{dtype}" if name in _ELEMENT_ARGS else "*fp32"
    return sig


def aot_specs(dtype: str, head_dims=None) -> list:
    """Every launch configuration of this module's kernels for q/k/v element type `dtype` ("bf16"/"fp32").

    One entry per distinct block shape over the supported head dims, or over `head_dims` (a list of (K, V))
    when given (K and V are runtime arguments, so dims sharing block sizes share a binary). Optional-state
    flags are compiled switched on, the variant with the most live registers. Consumed by
    `lctrain.kernels.aot`.
    """
    from lctrain.kernels.aot import AotSpec, divisibility_attrs  # lazy: aot imports this module by name

    if head_dims is None:
        head_dims = [(kd, vd) for kd in SUPPORTED_KEY_DIMS for vd in SUPPORTED_VALUE_DIMS]
    configs = [launch_config(kd, vd, dtype) for kd, vd in head_dims]
    variants = {}  # label -> (kernel, constexprs, num_warps, num_stages); dict keeps the first of equal labels
    for cfg in configs:
        common = {"BT": cfg.chunk, "PRECISION": cfg.precision}
        per_chunk = {**common, "BK": cfg.key_block, "BV": cfg.value_block}
        intra = {**common, "BK": cfg.intra_key_block, "BV": cfg.intra_value_block}
        state = {**common, "BK": cfg.state_key_block, "BV": cfg.state_value_block}
        launches = [
            (gdn_fwd_inverse_kernel, {**common, "BK": cfg.key_block}, cfg.num_warps),
            (gdn_fwd_wu_kernel, per_chunk, cfg.num_warps),
            (gdn_fwd_state_kernel, {**state, "HAS_INITIAL": True, "STORE_FINAL": True}, cfg.num_warps),
            (gdn_fwd_output_kernel, per_chunk, cfg.num_warps),
            (gdn_bwd_state_kernel, {**state, "HAS_D_FINAL": True, "STORE_D_INITIAL": True}, cfg.num_warps),
            (gdn_bwd_dv_kernel, {**common, "BV": cfg.intra_value_block}, cfg.num_warps),
            (gdn_bwd_dq_kernel, intra, cfg.num_warps),
            (gdn_bwd_dk_kernel, intra, cfg.num_warps),
            (gdn_bwd_dw_kernel, intra, cfg.num_warps),
            (gdn_bwd_wy_kernel, {**common, "BK": cfg.key_block}, cfg.num_warps),
        ]
        for kernel, constexprs, warps in launches:
            shape = ",".join(f"{key}={constexprs[key]}" for key in ("BT", "BK", "BV") if key in constexprs)
            label = f"{kernel.__name__}[{shape},warps={warps},stages={cfg.num_stages}]"
            variants.setdefault(label, (kernel, constexprs, warps, cfg.num_stages))
    specs = []
    for label, (kernel, constexprs, warps, stages) in variants.items():
        sig = _signature(kernel, constexprs, dtype)
        specs.append(AotSpec(kernel, sig, constexprs, warps, stages, label,
                             divisibility_attrs(kernel, sig, ints=("K", "V"))))
    return specs
