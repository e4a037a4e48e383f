"""Step time from FLOPs, bytes and bandwidths, with the overlap assumptions stated here.

  compute     each family's FLOPs / (peak x its efficiency); the SP attention runs the same fused op as one GPU
              does, block by block (its fp32 log-sum-exp merges are O(T H) and not counted); element-wise work
              (norms, activations, gates, the short convolutions) as memory traffic: the saved activations are
              written in forward, read in backward and their gradients written (3 passes, 4 with checkpointing) at
              HBM bandwidth x efficiency
  SP traffic  per-direction bytes (half of the counted sent + received) / link bandwidth x efficiency; the link
              is NVLink when the SP group fits in a node, the network otherwise. Ring attention overlaps its
              transfers with the block computations (exposed: what exceeds the attention compute); allgather,
              ulysses, LASP-2 and the conv halos are exposed (LASP-2's overlap with local work is not counted)
  DP traffic  over the whole world, NVLink within a node, the network beyond. ddp / zero1 / zero2: the gradient
              reduction overlaps the last micro-batch's backward (2/3 of its compute); zero1/zero2's parameter
              all-gather after the step is exposed. zero3 / fsdp: prefetched gathers and reduce-scatters overlap
              the whole step's compute
  optimizer   AdamW reads and writes 28 bytes per local parameter (fp32 weight, gradient, two moments)
step time = accumulation x (compute + exposed SP) + exposed DP + optimizer.
"""
from __future__ import annotations

from lctrain.plan.activations import activation_bytes
from lctrain.plan.candidate import Candidate, Workload
from lctrain.plan.comm import dp_bytes_per_step, grad_accum, max_rank_bytes_per_micro_step
from lctrain.plan.compute import flops_per_micro_step
from lctrain.plan.gpus import GPU


def _link(group: int, gpus_per_node: int, gpu: GPU) -> float:
    bandwidth = gpu.intra_bw if group <= gpus_per_node else gpu.inter_bw
    return bandwidth * gpu.efficiency["network"]


def step_time(shape, cand: Candidate, work: Workload, gpu: GPU) -> dict[str, float]:
    eff = gpu.efficiency
    flops = flops_per_micro_step(shape, cand.micro_batch_size, work.seq_len, cand.sp, cand.layout,
                                 cand.activation_checkpointing, attn=cand.attn)
    t_matmul = flops["matmul"] / (gpu.peak_flops * eff["matmul"])
    t_attention = flops["attention"] / (gpu.peak_flops * eff["attention"])
    t_recurrent = flops["recurrent"] / (gpu.peak_flops * eff["recurrent"])
    act = activation_bytes(shape, cand.micro_batch_size, work.seq_len, cand.sp, cand.layout, cand.attn,
                           work.dtype_bytes, False, work.backend)
    passes = 4 if cand.activation_checkpointing else 3
    t_memory = passes * act["layers"] / (gpu.hbm_bw * eff["memory"])
    compute = t_matmul + t_attention + t_recurrent + t_memory

    sp_link = _link(cand.sp, work.gpus_per_node, gpu)
    sp = max_rank_bytes_per_micro_step(shape, cand, work)
    t_sp = {k: v / 2 / sp_link for k, v in sp.items()}
    if cand.attn == "ring":
        t_sp["attn"] = max(0.0, t_sp["attn"] - t_attention)
    sp_exposed = sum(t_sp.values())

    accum = grad_accum(cand, work)
    dp = dp_bytes_per_step(shape.n_params, shape.block_params, cand, work)
    dp_link = _link(cand.world, work.gpus_per_node, gpu)
    t_grad, t_params = dp["grad"] / 2 / dp_link, dp["params"] / 2 / dp_link
    if cand.engine in ("zero3", "fsdp"):
        dp_exposed = max(0.0, t_grad + t_params - accum * compute)
    else:
        dp_exposed = max(0.0, t_grad - compute * 2 / 3) + t_params
    local_params = shape.n_params if cand.engine == "ddp" else shape.n_params / cand.world
    t_optimizer = 28 * local_params / (gpu.hbm_bw * eff["memory"])
    total = accum * (compute + sp_exposed) + dp_exposed + t_optimizer
    return {"step_time_s": total, "compute_s": accum * compute, "matmul_s": accum * t_matmul,
            "attention_s": accum * t_attention, "recurrent_s": accum * t_recurrent, "memory_bound_s": accum * t_memory,
            "sp_comm_exposed_s": accum * sp_exposed, "dp_comm_exposed_s": dp_exposed, "optimizer_s": t_optimizer}
