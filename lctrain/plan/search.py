"""Every sensible way to run the recipe on N GPUs, each evaluated, the ones that cannot run explained."""
from __future__ import annotations

import dataclasses
import itertools

from lctrain.config import ConfigError
from lctrain.plan.candidate import ENGINES, Candidate, Workload, engine_of
from lctrain.plan.comm import KINDS, dp_bytes_per_step, grad_accum, local_tokens, sp_bytes_per_step
from lctrain.plan.compute import model_flops_per_token
from lctrain.plan.gpus import GPU, GiB
from lctrain.plan.memory import memory_breakdown
from lctrain.plan.timing import step_time

ATTN_MODES = ("allgather", "ring", "ulysses")
LAYOUTS = ("contiguous", "zigzag")


def workload_of(cfg, world: int, gpus_per_node: int) -> Workload:
    """Sample length, global batch (train.tokens_per_step, or what the recipe's micro-batch gives on `world`
    GPUs) and numeric format of the recipe on GPUs (bf16 autocast unless train.dtype is float32)."""
    seq_len = cfg.data.seq_len
    tokens = cfg.train.tokens_per_step
    if not tokens:
        dp = max(world // max(cfg.parallel.sp, 1), 1)
        tokens = cfg.train.micro_batch_size * seq_len * dp
    fp32 = cfg.train.dtype == "float32"
    return Workload(seq_len=seq_len, tokens_per_step=tokens, dtype_bytes=4 if fp32 else 2,
                    gpus_per_node=gpus_per_node, backend="triton", mixed_precision=not fp32)


def rule_outs(shape, cand: Candidate, work: Workload) -> list[str]:
    """Why the candidate cannot run at all (memory aside)."""
    reasons = []
    if cand.sp < 1 or cand.world % cand.sp:
        return [f"sp={cand.sp} does not divide {cand.world} GPUs"]
    per_micro = cand.micro_batch_size * work.seq_len * cand.dp
    if work.tokens_per_step % per_micro:
        reasons.append(f"tokens_per_step {work.tokens_per_step} is not a multiple of micro_batch x seq_len x dp "
                       f"= {per_micro}")
    if cand.sp > 1 and cand.attn == "ulysses":
        bad = [(layer.heads, layer.kv_heads) for layer, _ in shape.grouped()
               if layer.type == "attn" and (layer.heads % cand.sp or layer.kv_heads % cand.sp)]
        if bad:
            reasons.append(f"ulysses needs heads ({bad[0][0]}) and kv heads ({bad[0][1]}) divisible by sp={cand.sp}")
    if cand.sp > 1:
        chunk = local_tokens(work.seq_len, cand.sp, cand.layout)[1]
        widest = max((k - 1 for layer, _ in shape.grouped() for _, k in layer.convs), default=0)
        if widest > chunk:
            reasons.append(f"conv halo of {widest} tokens exceeds the {chunk}-token chunk at sp={cand.sp}")
    return reasons


def evaluate(shape, cand: Candidate, work: Workload, gpu: GPU, bucket_elements: int = 200_000_000) -> dict:
    """One candidate's plan entry (the JSON contract's keys first)."""
    entry = {"dp": cand.dp, "sp": cand.sp, "attn": cand.attn, "engine": cand.engine, "layout": cand.layout,
             "activation_checkpointing": cand.activation_checkpointing, "micro_batch_size": cand.micro_batch_size}
    reasons = rule_outs(shape, cand, work)
    if reasons and reasons[0].startswith("sp="):
        return {**entry, "memory_gib": None, "comm_bytes_per_step": None, "step_time_s": None,
                "tokens_per_s": None, "mfu": None, "fits": False, "ruled_out": reasons}
    memory = memory_breakdown(shape, cand, work, bucket_elements)
    if memory["total_gib"] > gpu.memory_gib:
        reasons.append(f"out of memory: {memory['total_gib']:.1f} GiB > {gpu.memory_gib:.1f} GiB")
    times = step_time(shape, cand, work, gpu)
    step = times["step_time_s"]
    tokens_per_s_total = work.tokens_per_step / step
    mfu = model_flops_per_token(shape, work.seq_len) * tokens_per_s_total / (cand.world * gpu.peak_flops)
    return {**entry, "grad_accum": grad_accum(cand, work),
            "memory_gib": round(memory["total_gib"], 3),
            "comm_bytes_per_step": sp_bytes_per_step(shape, cand, work),
            "dp_comm_bytes_per_step": dp_bytes_per_step(shape.n_params, shape.block_params, cand, work),
            "step_time_s": step, "tokens_per_s": tokens_per_s_total / cand.world,
            "tokens_per_s_total": tokens_per_s_total, "mfu": mfu,
            "fits": not reasons, "ruled_out": reasons,
            "memory_breakdown_gib": {k: round(v / GiB, 4) for k, v in memory.items() if k != "total_gib"},
            "time_breakdown_s": {k: v for k, v in times.items() if k != "step_time_s"}}


def candidates(shape, cfg, world: int, work: Workload) -> list[Candidate]:
    has_attn = shape.count("attn") > 0
    current_attn, current_layout = cfg.parallel.attn, cfg.parallel.layout
    out = []
    for sp in (s for s in range(1, world + 1) if world % s == 0):
        dp = world // sp
        max_micro = max(work.tokens_per_step // (work.seq_len * dp), 1)
        micros = [m for m in (1, 2, 4, 8, 16, 32, 64) if m <= max_micro]
        attns = ATTN_MODES if sp > 1 and has_attn else (current_attn,)
        layouts = LAYOUTS if sp > 1 else (current_layout,)
        engines = ENGINES if world > 1 else ("ddp",)
        for attn, layout, engine, ac, micro in itertools.product(attns, layouts, engines, (False, True), micros):
            out.append(Candidate(world, sp, attn, layout, engine, ac, micro))
    return out


def current_candidate(cfg, world: int) -> Candidate:
    return Candidate(world, cfg.parallel.sp, cfg.parallel.attn, cfg.parallel.layout, engine_of(cfg),
                     cfg.model.activation_checkpointing, cfg.train.micro_batch_size)


def _rank_key(entry: dict):
    return (-entry["tokens_per_s"], entry["memory_gib"])


def plan(cfg, world: int, gpu: GPU, gpus_per_node: int = 8, shape=None) -> dict:
    """`{"current", "best", "candidates", ...}` for the recipe `cfg` on `world` GPUs of kind `gpu`."""
    if world < 1:
        raise ConfigError(f"plan: --gpus must be a positive integer, got {world}")
    if gpus_per_node < 1:
        raise ConfigError(f"plan: --gpus-per-node must be a positive integer, got {gpus_per_node}")
    from lctrain.plan.shape import model_shape
    shape = shape or model_shape(cfg)
    work = workload_of(cfg, world, gpus_per_node)
    bucket = cfg.deepspeed.reduce_bucket_size
    current = evaluate(shape, current_candidate(cfg, world), work, gpu, bucket)
    entries = [evaluate(shape, c, work, gpu, bucket) for c in candidates(shape, cfg, world, work)]
    fitting = sorted((e for e in entries if e["fits"]), key=_rank_key)
    best = fitting[0] if fitting else None
    return {"gpu": gpu.name, "gpus": world, "gpus_per_node": gpus_per_node,
            "efficiency": dict(gpu.efficiency), "efficiency_source": gpu.efficiency_source,
            "model": {"params": shape.n_params, "layers": [layer.type for layer in shape.layers],
                      "flops_per_token": model_flops_per_token(shape, work.seq_len)},
            "workload": dataclasses.asdict(work),
            "current": current, "best": best,
            "candidates": fitting + [e for e in entries if not e["fits"]],
            "comm_kinds": list(KINDS)}
