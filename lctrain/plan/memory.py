"""Memory per GPU for one candidate: model state by engine, activations, communication buffers, margin.

Peak model (bytes): states + max(forward end, optimizer step), where
  states       = parameters + optimizer state (+ gradient buckets / gathered blocks the engine keeps)
  forward end  = saved activations (with checkpointing: block inputs + one recomputed block) + the first
                 block's backward gradient buffers + what a recurrent op's backward recomputes (its chunk
                 tensors, beyond the blocks above it already freed) + the fused loss's chunk of logits and the
                 hidden / head gradients it forms in forward + SP buffers in flight
                 (+ gradients already accumulated when there is gradient accumulation)
  optimizer    = gradients + one fp32 temporary the size of the local parameters (foreach AdamW)
On a GPU the allocator needs room beyond the tensors' peak: `ALLOCATOR_MARGIN` of it for fragmentation and
caching, plus `CONTEXT_GIB` for the CUDA context, cuBLAS workspaces and NCCL buffers, which torch does not count.

Engines (n parameters, N = dp x sp ranks sharing the states, mixed precision = fp32 master weights):
  ddp    params 4n, grads 4n, AdamW moments 8n, DDP's gradient buckets 4n (N > 1), autocast's bf16 weight
         copies 2n (kept for backward; one block's worth with checkpointing)
  zero1  (DeepSpeed bf16) params 2n, grads 2n, fp32 master + moments 12n / N, gradient bucket
  zero2  as zero1 with the gradients sharded: 2n / N
  zero3  params 2n / N + the gathered working set (2 blocks), grads 2n / N, 12n / N
  fsdp   (FSDP2, bf16 compute, fp32 reduce) params 4n / N, grads 4n / N, moments 8n / N, + 2 unsharded bf16 blocks
         and one block's unsharded fp32 gradient
"""
from __future__ import annotations

from lctrain.models.loss import loss_chunk_size
from lctrain.plan.activations import activation_bytes, backward_working_bytes, op_backward_bytes, residual_bytes
from lctrain.plan.candidate import Candidate, Workload
from lctrain.plan.comm import grad_accum, local_tokens

GiB = 2 ** 30
ALLOCATOR_MARGIN = 0.10
CONTEXT_GIB = 1.0


def model_state_bytes(shape, cand: Candidate, work: Workload, bucket_elements: int = 200_000_000) -> dict[str, int]:
    # n: every weight (held, sharded or not); t: the weights that train, the only ones with gradients, gradient
    # buckets and optimizer state (all of them, except under LoRA, whose frozen base has none)
    n, t, world = shape.n_params, shape.trained, cand.world
    block = max(shape.block_params, shape.vocab_size * shape.d_model)
    half = work.dtype_bytes
    if not work.mixed_precision:  # everything in one dtype (the fp32 CPU validation)
        p = work.dtype_bytes
        if cand.engine == "ddp":
            return {"params": n * p, "grads": t * p, "optimizer": 2 * t * p,
                    "buckets": t * p if world > 1 else 0, "weight_copies": 0}
        return {"params": n * p // (world if cand.engine in ("zero3", "fsdp") else 1),
                "grads": t * p // (world if cand.engine != "zero1" else 1), "optimizer": 2 * t * p // world,
                "buckets": 2 * block * p if cand.engine in ("zero3", "fsdp") else 0, "weight_copies": 0}
    bucket = min(bucket_elements, t) * 4
    if cand.engine == "ddp":
        copies = (2 * block if cand.activation_checkpointing else n) * half
        return {"params": 4 * n, "grads": 4 * t, "optimizer": 8 * t, "buckets": 4 * t if world > 1 else 0,
                "weight_copies": copies}
    if cand.engine in ("zero1", "zero2"):
        grads = half * t if cand.engine == "zero1" else half * t // world
        return {"params": half * n, "grads": grads, "optimizer": 12 * t // world, "buckets": bucket,
                "weight_copies": 0}
    if cand.engine == "zero3":
        return {"params": half * n // world, "grads": half * t // world, "optimizer": 12 * t // world,
                "buckets": 2 * block * half + bucket, "weight_copies": 0}
    return {"params": 4 * n // world, "grads": 4 * t // world, "optimizer": 8 * t // world,
            "buckets": 2 * block * half + 4 * block, "weight_copies": 0}


def sp_attention_working_bytes(layer, rows: int, t_local: int, sp: int, attn: str, elem: int) -> int:
    """Transient bytes of one SP attention layer's backward beyond its saved tensors: the communication buffers
    and the gradient accumulators (dQ and the visiting / gathered dK, dV in fp32). The fused block op itself needs
    only tile-sized scratch (on-chip for the Triton kernels; a few `[H, 128, 512]` fp32 tiles on the CPU path), no
    `[T_local, T_local]` tensor."""
    w, e, wide = sp, elem, max(elem, 4)
    kv = rows * t_local * layer.kv_heads * 2 * layer.head_dim
    q = rows * t_local * layer.heads * layer.head_dim
    if attn == "allgather":   # dK/dV of every rank (+ its copy in the input dtype for the reduce-scatter), dQ
        return w * kv * wide + (w * kv * e if e < wide else 0) + q * wide
    if attn == "ring":        # the K/V block in flight, the travelling dK/dV, dQ
        return 2 * kv * e + 2 * kv * wide + q * wide
    return 2 * (q + kv) * e + (q + kv) * wide   # ulysses: packed all-to-all send / receive, dQ/dK/dV per head group


def sp_buffer_bytes(shape, cand: Candidate, work: Workload) -> int:
    """Largest transient buffer of one layer's backward beyond its saved activations (SP attention layers)."""
    if cand.sp == 1:
        return 0
    t_local = local_tokens(work.seq_len, cand.sp, cand.layout)[0]
    return max((sp_attention_working_bytes(layer, cand.micro_batch_size, t_local, cand.sp, cand.attn,
                                           work.dtype_bytes) for layer, _ in shape.grouped() if layer.type == "attn"),
               default=0)


def memory_breakdown(shape, cand: Candidate, work: Workload, bucket_elements: int = 200_000_000) -> dict:
    """Bytes per part and the peak, for one GPU. `total_gib` adds the allocator margin and the CUDA context."""
    states = model_state_bytes(shape, cand, work, bucket_elements)
    act = activation_bytes(shape, cand.micro_batch_size, work.seq_len, cand.sp, cand.layout, cand.attn,
                           work.dtype_bytes, cand.activation_checkpointing, work.backend)
    working = 0 if cand.activation_checkpointing else backward_working_bytes(
        shape, cand.micro_batch_size, work.seq_len, cand.sp, cand.layout, work.dtype_bytes)
    recurrent_op = op_backward_bytes(shape, cand.micro_batch_size, work.seq_len, cand.sp, cand.layout, cand.attn,
                                     work.dtype_bytes, cand.activation_checkpointing, work.backend)
    tokens = cand.micro_batch_size * local_tokens(work.seq_len, cand.sp, cand.layout)[0]
    # the fused cross-entropy: one chunk's fp32 logits, turned into their gradient in place (+ the bf16 logits
    # before the fp32 copy and the gradient's bf16 copy under mixed precision); the hidden-state and head-weight
    # gradients it forms in forward (fp32 weight gradient) are kept until backward
    chunk = loss_chunk_size(shape.loss_chunk_tokens, tokens, shape.vocab_size)
    logits = chunk * shape.vocab_size * (4 + (work.dtype_bytes if work.mixed_precision else 0))
    loss_gradients = tokens * shape.d_model * residual_bytes(work.dtype_bytes) + shape.vocab_size * shape.d_model * 4
    sp_buffers = sp_buffer_bytes(shape, cand, work)
    accumulated = states["grads"] if grad_accum(cand, work) > 1 else 0
    forward_end = sum(act.values()) + working + logits + loss_gradients + sp_buffers + accumulated + recurrent_op
    optimizer_step = states["grads"] + 4 * shape.trained // (cand.world if cand.engine != "ddp" else 1)
    fixed = states["params"] + states["optimizer"] + states["buckets"] + states["weight_copies"]
    peak = fixed + max(forward_end, optimizer_step)
    return {**{k: int(v) for k, v in states.items()}, **{f"activations_{k}": v for k, v in act.items()},
            "backward_working": int(working), "recurrent_op_backward": int(recurrent_op), "logits": int(logits),
            "loss_gradients": int(loss_gradients), "sp_buffers": int(sp_buffers),
            "peak_tensor_bytes": int(peak),
            "total_gib": (peak * (1 + ALLOCATOR_MARGIN)) / GiB + CONTEXT_GIB}
