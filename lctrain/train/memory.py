"""What `--dry-run` prints about memory, per process, for the path that will run: bf16 activations under
`train.dtype: bfloat16`, and under `auto` on CUDA (fp32 on CPU); the Triton kernels' saved tensors on CUDA, the
chunked torch path's on CPU; softmax attention through the fused op (no `[H, T, T]` term on any backend).

For the mixer types `lctrain plan` models (attn, gdn, linear, conv) the figures are the planner's
(`lctrain.plan.activations`, `lctrain.plan.memory`), so the dry run and the plan agree; the other types (swa,
based, landmark, titans) use the same terms with their own saved-tensor counts (`lctrain.train.mixer_memory`).
The activation line adds one loss chunk of fp32 logits and its gradient (`lctrain.models.loss.loss_chunk_size`,
also for `model.loss_chunk_tokens: 0`); the peak line is the whole step (`peak_memory_estimate`), checked against
MemTracker's measured peak of real fp32 steps on CPU in `tests/train/test_dry_run_peak.py`.

Under LoRA only the parameters that train (adapters, `lora.trainable`) have gradients and optimizer state; the
frozen base is counted as weights alone. Frozen weights also let autograd keep fewer activations (an op need not
save its input for a frozen weight's gradient), which the saved-tensor counts do not model: LoRA estimates err
high (measured +21% to +35% on CPU, `tests/train/test_lora_memory.py`).

Documents are not known before the data is read, so the estimate takes them as long (whole chunks): the chunked
torch paths pad every packed document to a multiple of their chunk (64), so many short documents cost more in
a recurrent op's backward (measured: 100-token documents +15% of a GDN hybrid's peak), and the Taylor op holds
one document's chunk tensors at a time, so packed documents cost less than the estimate's one per row.
"""
from __future__ import annotations

import dataclasses

import torch

from lctrain.models.blocks import default_ffn_dim
from lctrain.models.loss import loss_chunk_size


def _device_type(device_type: str | None) -> str:
    return device_type or ("cuda" if torch.cuda.is_available() else "cpu")


def activation_memory_estimate(cfg, model, device_type: str | None = None) -> int:
    """Saved activations of one micro-batch plus one loss chunk's logits, bytes (default device: CUDA if any)."""
    from lctrain.plan.search import current_candidate
    from lctrain.plan.shape import SUPPORTED
    work = run_workload(cfg, _device_type(device_type))
    tokens = cfg.train.micro_batch_size * cfg.data.seq_len // cfg.parallel.sp
    vocab = model.cfg.vocab_size
    logits = loss_chunk_size(model.cfg.loss_chunk_tokens, tokens, vocab) * vocab * 4 * 2
    if set(model.layer_types) <= set(SUPPORTED):
        from lctrain.plan.activations import activation_bytes
        from lctrain.plan.shape import shape_of
        parts = activation_bytes(shape_of(model), cfg.train.micro_batch_size, cfg.data.seq_len, cfg.parallel.sp,
                                 cfg.parallel.layout, cfg.parallel.attn, work.dtype_bytes,
                                 cfg.model.activation_checkpointing, work.backend)
        return sum(parts.values()) + logits
    parts = breakdown_any_mixers(cfg, model, current_candidate(cfg, cfg.parallel.sp), work)
    return sum(v for k, v in parts.items() if k.startswith("activations_")) + logits


def fsdp_memory_per_gpu(cfg, model, world: int) -> dict[str, float]:
    """Bytes per GPU under `train.engine: fsdp` on `world` GPUs (estimate, as on CUDA: bf16 compute, attention
    through flash/ring kernels with no [T, T] scores): fp32 master weights, fp32 gradients and AdamW's two fp32
    moments (gradients and moments of the parameters that train only: under LoRA the frozen base has none), each
    sharded over the world (plus full gradients in bf16 when micro-batches accumulate with
    `parallel.fsdp_grad_sync: step`); the largest block gathered in bf16 (twice: the next one is prefetched);
    activations as a rough count of about 8 d + 3 ffn elements per layer and token (the block input alone with
    checkpointing) and one loss chunk of fp32 logits, for this rank's T / sp tokens. (Recipes of the planner's
    mixer types print the planner's figure instead: `fsdp_memory_lines`.)"""
    n_params = sum(p.numel() for p in model.parameters())
    trained = trained_params(model)  # LoRA: only adapters (and lora.trainable) have gradients and AdamW state
    largest_block = max((sum(p.numel() for p in layer.parameters()) for layer in model.layers), default=0)
    root = n_params - sum(p.numel() for layer in model.layers for p in layer.parameters())
    compute_bytes = 2 if cfg.train.dtype != "float32" else 4
    m = cfg.model
    tokens = cfg.train.micro_batch_size * cfg.data.seq_len // cfg.parallel.sp
    per_layer = tokens * (8 * m.d_model + 3 * (m.ffn_dim or default_ffn_dim(m.d_model))) * compute_bytes
    kept = tokens * m.d_model * compute_bytes if m.activation_checkpointing else per_layer
    logits = loss_chunk_size(m.loss_chunk_tokens, tokens, m.vocab_size) * m.vocab_size * 4 * 2
    out = {
        "weights": 4 * n_params / world,
        "gradients": 4 * trained / world,
        "adamw": 8 * trained / world,
        "gathered": compute_bytes * (2 * largest_block + root),
        "activations": len(model.layers) * kept + per_layer * m.activation_checkpointing + logits,
    }
    dp = max(world // cfg.parallel.sp, 1)
    accum = cfg.train.tokens_per_step // (cfg.train.micro_batch_size * cfg.data.seq_len * dp) or 1
    if accum > 1 and cfg.parallel.fsdp_grad_sync == "step":  # micro-batches accumulate full, unsharded gradients
        out["gradients"] += compute_bytes * trained
    out["total"] = sum(out.values())
    return out


def trained_params(model) -> int:
    """Parameters with gradients and optimizer state: all, except under LoRA (adapters and `lora.trainable`)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def fsdp_memory_lines(cfg, model, worlds: list[int]) -> list[str]:
    """Summary lines for `--dry-run`: the per-GPU estimate under fsdp at each world size (the recipe's
    parallel.sp kept). For the layer types `lctrain plan` models this is the planner's figure for the recipe's
    layout (so the dry run and the plan agree); otherwise `fsdp_memory_per_gpu`."""
    from lctrain.plan.shape import SUPPORTED
    planned = set(model.layer_types) <= set(SUPPORTED)
    lines = []
    for world in worlds:
        if world % cfg.parallel.sp:
            continue
        where = f"fsdp memory per GPU at {world} GPUs (dp {world // cfg.parallel.sp} x sp {cfg.parallel.sp}"
        if planned:
            from lctrain.plan.memory import memory_breakdown
            from lctrain.plan.search import current_candidate, workload_of
            from lctrain.plan.shape import shape_of
            candidate = dataclasses.replace(current_candidate(cfg, world), engine="fsdp")
            parts = memory_breakdown(shape_of(model), candidate, workload_of(cfg, world, 8))
            gib = {k: v / 2**30 for k, v in parts.items() if k != "total_gib"}
            act = sum(v for k, v in gib.items() if k.startswith("activations_"))
            lines.append(f"{where}, as `lctrain plan` models it): {parts['total_gib']:.1f} GiB with allocator "
                         f"margin and CUDA context = weights {gib['params']:.2f} + gradients {gib['grads']:.2f} + "
                         f"AdamW {gib['optimizer']:.2f} + gathered blocks {gib['buckets']:.2f} + activations "
                         f"{act:.2f} (peak of tensors {gib['peak_tensor_bytes']:.2f})")
            continue
        m = {k: v / 2**30 for k, v in fsdp_memory_per_gpu(cfg, model, world).items()}
        lines.append(f"{where}, estimate): {m['total']:.1f} GiB = weights {m['weights']:.2f} + gradients "
                     f"{m['gradients']:.2f} + AdamW {m['adamw']:.2f} + gathered blocks {m['gathered']:.2f} + "
                     f"activations {m['activations']:.2f}")
    return lines


def run_workload(cfg, device_type: str):
    """The numeric format and kernel path this process will train with: bf16 autocast under `train.dtype: auto`
    on CUDA and under `bfloat16` anywhere (fp32 master weights, so mixed precision), fp32 otherwise; Triton
    kernels on CUDA, the chunked torch path on CPU."""
    from lctrain.plan.candidate import Workload
    bf16 = cfg.train.dtype == "bfloat16" or (cfg.train.dtype == "auto" and device_type == "cuda")
    return Workload(seq_len=cfg.data.seq_len, tokens_per_step=cfg.train.tokens_per_step, dtype_bytes=2 if bf16 else 4,
                    backend="triton" if device_type == "cuda" else "torch", mixed_precision=bf16)


def peak_memory_estimate(cfg, model, world: int = 1, device_type: str | None = None) -> dict[str, int]:
    """Peak bytes of live tensors per process in one training step of the recipe as it will run here (its engine
    on `world` processes, its dtype and kernels on `device_type`): the planner's peak model
    (`lctrain.plan.memory.memory_breakdown`, whose docstring has the terms); layer types the planner does not
    model count their saved tensors from `lctrain.train.mixer_memory`. Peak = `states` (weights, optimizer
    moments, engine buffers) + max(`forward_end`: saved activations, backward buffers, the loss chunk and the
    gradients formed in forward; `optimizer_step`: gradients and the optimizer's temporary)."""
    from lctrain.plan.comm import grad_accum
    from lctrain.plan.search import current_candidate
    from lctrain.plan.shape import SUPPORTED, shape_of
    cand = current_candidate(cfg, world)
    work = run_workload(cfg, _device_type(device_type))
    if set(model.layer_types) <= set(SUPPORTED):
        from lctrain.plan.memory import memory_breakdown
        parts = memory_breakdown(shape_of(model), cand, work, cfg.deepspeed.reduce_bucket_size)
    else:
        parts = breakdown_any_mixers(cfg, model, cand, work)
    states = parts["params"] + parts["optimizer"] + parts["buckets"] + parts["weight_copies"]
    forward_end = sum(v for k, v in parts.items() if k.startswith("activations_") or k in _FORWARD_END)
    forward_end += parts["grads"] if grad_accum(cand, work) > 1 else 0
    optimizer_step = parts["grads"] + 4 * trained_params(model) // (cand.world if cand.engine != "ddp" else 1)
    return {"states": states, "forward_end": forward_end, "optimizer_step": optimizer_step,
            "peak": parts["peak_tensor_bytes"]}


_FORWARD_END = ("backward_working", "recurrent_op_backward", "logits", "loss_gradients", "sp_buffers")


def breakdown_any_mixers(cfg, model, cand, work) -> dict:
    """`memory_breakdown`'s parts and peak for a model with any mixer types: the same terms, with the planner's
    per-layer counts for its types and `lctrain.train.mixer_memory`'s for the others."""
    from lctrain.plan import activations as plan_act
    from lctrain.plan.comm import grad_accum, local_tokens
    from lctrain.plan.memory import model_state_bytes, sp_buffer_bytes
    from lctrain.plan.shape import SUPPORTED, ModelShape, _layer, trainable_params
    from lctrain.train import mixer_memory

    d, ffn, vocab, elem = model.cfg.d_model, model.layers[0].mlp.up.out_features, model.cfg.vocab_size, work.dtype_bytes
    planned = [_layer(b) if b.mixer_type in SUPPORTED else None for b in model.layers]
    shape = ModelShape(d_model=d, ffn_dim=ffn, vocab_size=vocab, n_params=model.num_parameters(), matmul_params=0,
                       trainable_params=trainable_params(model),
                       layers=tuple(p for p in planned if p is not None),
                       block_params=max(sum(p.numel() for p in b.parameters()) for b in model.layers),
                       loss_chunk_tokens=model.cfg.loss_chunk_tokens)
    states = model_state_bytes(shape, cand, work, cfg.deepspeed.reduce_bucket_size)
    tokens = cand.micro_batch_size * local_tokens(work.seq_len, cand.sp, cand.layout)[0]
    ckpt = cand.activation_checkpointing

    def saved(block, layer) -> float:  # bytes one block keeps for backward
        if layer is not None:
            return tokens * elem * plan_act.layer_elements(layer, d, ffn, elem, work.backend, cand.sp, cand.attn,
                                                           work.seq_len) \
                + plan_act.lasp2_state_bytes(layer, cand.micro_batch_size, cand.sp, cand.layout)
        mixer = mixer_memory.mixer_elements(block.mixer, d, elem)
        return tokens * elem * (plan_act.block_elements(d, ffn, elem) + mixer)

    per_layer = [saved(b, p) for b, p in zip(model.layers, planned)]
    act = plan_act.activation_bytes(dataclasses.replace(shape, layers=()), cand.micro_batch_size, work.seq_len,
                                    cand.sp, cand.layout, cand.attn, elem, False, work.backend)
    act["layers"] = len(per_layer) * tokens * d * plan_act.residual_bytes(elem) if ckpt else int(sum(per_layer))
    act["recompute"] = int(max(per_layer)) if ckpt else 0
    working = 0
    if not ckpt:  # the residual stream's gradient and the widest op's input gradients (planner's rule)
        widest = 0
        for block, layer in zip(model.layers, planned):
            if layer is None:
                widest = max(widest, mixer_memory.op_input_elements(block.mixer, d) * elem)
            else:
                one = dataclasses.replace(shape, layers=(layer,), layer_groups=())
                widest = max(widest, plan_act.backward_working_bytes(one, 1, 1, 1, "contiguous", elem)
                             - 2 * d * plan_act.residual_bytes(elem))
        working = int(tokens * (2 * d * plan_act.residual_bytes(elem) + widest))
    recurrent, freed = 0.0, 0.0  # an op's backward recomputes its forward once the blocks above freed theirs
    for block, layer, size in reversed(list(zip(model.layers, planned, per_layer))):
        if layer is None:
            transient = tokens * 4 * mixer_memory.op_backward_elements(block.mixer, work.backend)
            own = tokens * elem * (3 * ffn + 2 * d)
        else:
            transient = tokens * 4 * plan_act.op_backward_elements(layer, work.backend)
            own = tokens * elem * (3 * ffn + 2 * d + 4 * layer.heads * layer.value_dim)
        recurrent = max(recurrent, transient - own - (0 if ckpt else freed))
        freed += size
    chunk = loss_chunk_size(shape.loss_chunk_tokens, tokens, vocab)
    logits = chunk * vocab * (4 + (elem if work.mixed_precision else 0))
    loss_gradients = tokens * d * plan_act.residual_bytes(elem) + vocab * d * 4
    sp_buffers = sp_buffer_bytes(shape, cand, work)
    accumulated = states["grads"] if grad_accum(cand, work) > 1 else 0
    forward_end = sum(act.values()) + working + logits + loss_gradients + sp_buffers + accumulated + int(recurrent)
    optimizer_step = states["grads"] + 4 * shape.trained // (cand.world if cand.engine != "ddp" else 1)
    fixed = states["params"] + states["optimizer"] + states["buckets"] + states["weight_copies"]
    return {**{k: int(v) for k, v in states.items()}, **{f"activations_{k}": int(v) for k, v in act.items()},
            "backward_working": working, "recurrent_op_backward": int(recurrent), "logits": int(logits),
            "loss_gradients": int(loss_gradients), "sp_buffers": int(sp_buffers),
            "peak_tensor_bytes": int(fixed + max(forward_end, optimizer_step))}


def peak_memory_line(cfg, model, world: int, device_type: str) -> str:
    """`--dry-run`'s line for `peak_memory_estimate` (in MiB, so small models show a number to compare). A dry run
    on fewer processes than one sequence-parallel group plans for one whole group."""
    sp = cfg.parallel.sp
    world = -(-max(world, 1) // sp) * sp
    est = peak_memory_estimate(cfg, model, world, device_type)
    work = run_workload(cfg, _device_type(device_type))
    mib = {k: v / 2**20 for k, v in est.items()}
    how = f"{'bf16 autocast' if work.mixed_precision else 'fp32'}, {work.backend} kernels"
    return (f"peak memory (estimate, per process, {how}): {mib['peak']:.1f} MiB ({mib['peak'] / 1024:.2f} GiB, "
            f"{cfg.train.engine} on {world} process{'es' if world > 1 else ''}) = weights and optimizer state "
            f"{mib['states']:.1f} + max(activations, loss and backward buffers {mib['forward_end']:.1f}, "
            f"gradients and optimizer step {mib['optimizer_step']:.1f})")
