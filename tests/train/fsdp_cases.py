"""Engine-level cases for the FSDP tests, run in spawned gloo processes (no data pipeline, no CLI start-up).

Every case trains a small LanguageModel on fixed random global batches: rank r of W takes rows r, r + W, ... of
each step's batch, so any world size sees the same global step and its losses can be compared.
"""
from __future__ import annotations

import datetime
import json
import math
import os
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

from lctrain.config import load_config
from lctrain.models import LanguageModel
from lctrain.models.init import parameters_on_meta
from lctrain.train.checkpoint import CheckpointManager
from lctrain.train.dist import DistEnv
from lctrain.train.engine import build_engine
from lctrain.train.loop import plan_layout

VOCAB, SEQ, ROWS = 97, 24, 4  # a step's global batch: ROWS sequences of SEQ tokens
BASE = ["model.d_model=32", "model.n_heads=2", "model.ffn_dim=64", "model.n_layers=3", "model.pattern=GAL",
        f"model.vocab_size={VOCAB}", f"data.seq_len={SEQ}", "train.lr=1e-2", "train.warmup_steps=1",
        "train.steps=6", "train.grad_clip=0.5", "train.dtype=float32"]


def make_cfg(engine: str, world: int, extra=()):
    micro = ROWS // world // 2 if ROWS // world >= 2 else 1  # two micro-batches per step where rows allow
    tokens = ROWS * SEQ
    return load_config(None, [*BASE, f"train.engine={engine}", f"train.micro_batch_size={micro}",
                              f"train.tokens_per_step={tokens}", *extra])


LORA = ["lora.enabled=true", "lora.r=4", "lora.target_modules=[q_proj,v_proj,o_proj]", "checkpoint.init_from=base"]


def build(cfg, env, meta: bool, base: str | None = None):
    """The engine over a fresh model: built on meta (fsdp) or eagerly. With `base` (a LoRA case) the model gets
    adapters before the engine wraps or shards it, as `Trainer._init_from` does: eagerly built, the model is the
    base (rank 0 writes it to `base` for the cases that read it); on meta, the engine reads `base` piece by piece."""
    torch.manual_seed(cfg.train.seed)
    if meta:
        with parameters_on_meta():
            model = LanguageModel(cfg.model)
    else:
        model = LanguageModel(cfg.model)
    if base is not None:
        from lctrain.train.lora import apply_lora
        if meta:
            from lctrain.train.meta_source import check, open_source
            model._init_source = open_source(base)
            check(model, model._init_source)
            with parameters_on_meta():
                model = apply_lora(model, cfg.lora)
        else:
            from lctrain.train.checkpoint import _model_tensors
            from safetensors.torch import save_file
            if env.rank == 0 and not os.path.exists(base):
                save_file(_model_tensors(model), base)
            model = apply_lora(model, cfg.lora)
        model._lora_base = base
    if cfg.model.compile:
        from lctrain.models.compile import compile_blocks
        compile_blocks(model, cfg.model.compile_backend)
    layout = plan_layout(cfg, env)
    return build_engine(model, cfg, env, layout), layout


def global_batch(step: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1000 + step % 2)  # two batches, alternating: the loss falls
    return torch.randint(0, VOCAB, (ROWS, SEQ + 1), generator=gen)


def train_steps(engine, layout, env, steps, norms=None, probe=None) -> list[float]:
    """The loop's protocol (micro_step / backward with world / n_global / step) on fixed global batches.
    `norms`: a list that receives each step's gradient norm; `probe(i, last)`: called after each micro-batch's
    backward."""
    losses = []
    for step in steps:
        rows = global_batch(step)[env.rank::layout.world]
        micro = rows.chunk(layout.grad_accum)
        n_global = float(ROWS * SEQ)
        total = torch.zeros((), dtype=torch.float64)
        for i, chunk in enumerate(micro):
            with engine.micro_step(last=i == len(micro) - 1):
                out = engine.model(chunk[:, :-1], labels=chunk[:, 1:])
                engine.backward(out.loss_sum, layout.world / n_global)
            if probe is not None:
                probe(i, i == len(micro) - 1)
            total += out.loss_sum.detach().double()
        if env.distributed:
            dist.all_reduce(total)
        grad_norm, _ = engine.step(total.item() / n_global)
        if norms is not None:
            norms.append(grad_norm)
        losses.append(total.item() / n_global)
    return losses


def full_weights(engine) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in engine.module.named_parameters():
        p = p.detach()
        out[name] = p.full_tensor() if hasattr(p, "full_tensor") else p.clone()
    return out


# ------------------------------------------------------------------------------------------------------- cases
def case_meta_init(env, args):
    """A meta-built model, sharded and materialised piece by piece, equals the eager build for the same seed."""
    pattern = args["pattern"]
    cfg = make_cfg("fsdp", env.world_size, [f"model.pattern={pattern}", f"model.n_layers={len(pattern)}",
                                            "model.tie_embeddings=false"])
    torch.manual_seed(cfg.train.seed)
    eager = LanguageModel(cfg.model)
    engine, _ = build(cfg, env, meta=True)
    got = full_weights(engine)
    want = dict(eager.named_parameters())
    assert sorted(got) == sorted(want), sorted(set(got) ^ set(want))
    for name, value in want.items():
        assert torch.equal(got[name], value.detach()), name
    for name, buf in eager.named_buffers():
        assert torch.equal(dict(engine.module.named_buffers())[name], buf), name
    return {"n": len(got)}


def barrier(env):
    return lambda: dist.barrier() if env.distributed else None


def case_train(env, args):
    """Losses and gradient norms of `steps` steps (2 micro-batches per step where the rows allow), and the final
    weights' checksum. With `lora`: adapters on a base written to args["base"], and a checkpoint saved at the end
    into args["run"] (what load_model and export read)."""
    lora = args.get("lora", False)
    cfg = make_cfg(args["engine"], env.world_size, [*args.get("extra", ()), *(LORA if lora else [])])
    engine, layout = build(cfg, env, meta=args["engine"] == "fsdp" and not args.get("host"),
                           base=args["base"] if lora else None)
    initial = full_weights(engine) if args.get("initial") or args.get("frozen") else {}
    norms = []
    steps = args.get("steps", 6)
    losses = train_steps(engine, layout, env, range(steps), norms)
    weights = full_weights(engine)
    if lora:
        ckpt = CheckpointManager(args["run"], 2, env.rank, env.world_size)
        engine.save(ckpt, steps, {"step": steps, "scheduler": engine.scheduler.state_dict()}, {"position": steps},
                    cfg.to_yaml(), barrier(env))
    return {"losses": losses, "norms": norms, "weights": {k: v.double().sum().item() for k, v in weights.items()},
            "trained": sorted(n for n, p in engine.module.named_parameters() if p.requires_grad),
            "in_optimizer": sum(len(g["params"]) for g in engine.optimizer.param_groups),
            "initial": {k: v.tolist() for k, v in initial.items()} if args.get("initial") else {},
            "frozen_kept": [k for k in initial if "base_layer" in k and torch.equal(initial[k], weights[k])],
            "dtypes": sorted({str(p.dtype) for p in engine.module.parameters()})}


def case_grad_sync(env, args):
    """Which micro-batches reduce-scatter: FSDP2 hands the sharded gradient (`param.grad`) over only after a
    reduce-scatter; until then the unsharded gradients accumulate inside FSDP."""
    cfg = make_cfg("fsdp", env.world_size, args.get("extra", ()))
    engine, layout = build(cfg, env, meta=True)
    seen = []

    def probe(i, last):
        seen.append([i, last, any(p.grad is not None for p in engine.params)])

    train_steps(engine, layout, env, range(2), probe=probe)
    return {"seen": seen}


def case_save(env, args):
    """Train 3 steps, save (sync or async) at step 3, then train 3 more: the reference for case_resume."""
    lora = args.get("lora", False)
    cfg = make_cfg("fsdp", env.world_size, [f"checkpoint.async_save={args['async']}", *(LORA if lora else [])])
    engine, layout = build(cfg, env, meta=True, base=args["base"] if lora else None)
    ckpt = CheckpointManager(args["run"], 2, env.rank, env.world_size)
    first = train_steps(engine, layout, env, range(3))
    engine.save(ckpt, 3, {"step": 3, "scheduler": engine.scheduler.state_dict()}, {"position": 3}, "",
                lambda: dist.barrier() if env.distributed else None)
    rest = train_steps(engine, layout, env, range(3, 6))  # overlaps the background write when async
    engine.finish_saves()
    return {"losses": first + rest, "latest": (Path(args["run"]) / "checkpoints" / "latest").read_text()}


def case_resume(env, args):
    lora = args.get("lora", False)
    cfg = make_cfg("fsdp", env.world_size, LORA if lora else [])
    engine, layout = build(cfg, env, meta=True, base=args["base"] if lora else None)
    ckpt = CheckpointManager(args["run"], 2, env.rank, env.world_size)
    state, data = engine.load(ckpt, ckpt.latest())
    engine.scheduler.load_state_dict(state["scheduler"])
    return {"losses": train_steps(engine, layout, env, range(state["step"], 6)), "data": data}


def case_init_from_sharded(env, args):
    """checkpoint.init_from a sharded checkpoint on a meta-built model: the weights read piece by piece equal the
    checkpoint's as a resume restores them."""
    from lctrain.train.meta_source import check, open_source
    cfg = make_cfg("fsdp", env.world_size)
    torch.manual_seed(cfg.train.seed + 1)  # another init: every value must come from the checkpoint
    with parameters_on_meta():
        model = LanguageModel(cfg.model)
    source = open_source(args["run"])
    assert type(source).__name__ == "_Sharded", source
    check(model, source)
    model._init_source = source
    engine = build_engine(model, cfg, env, plan_layout(cfg, env))
    resumed, _ = build(cfg, env, meta=True)
    ckpt = CheckpointManager(args["run"], 2, env.rank, env.world_size)
    resumed.load(ckpt, ckpt.latest())
    got, want = full_weights(engine), full_weights(resumed)
    assert sorted(got) == sorted(want)
    assert all(torch.equal(got[k], want[k]) for k in want), [k for k in want if not torch.equal(got[k], want[k])]
    return {"n": len(got)}


def case_nonfinite(env, args):
    """A step whose gradients are NaN is skipped on every shard (weights untouched); training then goes on."""
    cfg = make_cfg("fsdp", env.world_size)
    engine, layout = build(cfg, env, meta=True)
    train_steps(engine, layout, env, range(1))
    before = full_weights(engine)
    rows = global_batch(1)[env.rank::layout.world]
    with engine.micro_step(last=True):
        out = engine.model(rows[:, :-1], labels=rows[:, 1:])
        engine.backward(out.loss_sum * float("nan"), 1.0)
    grad_norm, applied = engine.step(float("nan"))
    after = full_weights(engine)
    assert not applied and math.isnan(grad_norm)
    assert all(torch.equal(before[k], after[k]) for k in before)
    later = train_steps(engine, layout, env, range(2, 4))
    assert all(math.isfinite(x) for x in later)
    return {"later": later}


def case_eval(env, args):
    """The loop's evaluation (Trainer.evaluate) under the engine, after 2 steps: every rank runs every batch (each
    forward gathers weights, a collective); the result is the loss of the full weights over all batches. Training
    continues after it."""
    from types import SimpleNamespace

    from lctrain.train.batches import BatchPreparer
    from lctrain.train.loop import Trainer

    cfg = make_cfg(args["engine"], env.world_size, args.get("extra", ()))
    engine, layout = build(cfg, env, meta=args["engine"] == "fsdp")
    train_steps(engine, layout, env, range(2))
    gen = torch.Generator().manual_seed(7)
    batches = []
    for _ in range(3):  # an odd number: no even split over the ranks
        ids = torch.randint(0, VOCAB, (2, SEQ + 1), generator=gen)
        batches.append({"input_ids": ids[:, :-1], "labels": ids[:, 1:],
                        "position_ids": torch.arange(SEQ).repeat(2, 1)})
    trainer = Trainer.__new__(Trainer)  # only what evaluate() uses
    trainer.cfg, trainer.env, trainer.layout = cfg, env, layout
    trainer.autocast_dtype, trainer.distiller = None, None
    trainer.batches = BatchPreparer(cfg, env, layout)
    trainer.data = SimpleNamespace(eval_batches=lambda n: batches)
    result = trainer.evaluate(engine)
    plain = LanguageModel(cfg.model).eval()
    plain.load_state_dict(full_weights(engine))
    with torch.no_grad():
        outs = [plain(b["input_ids"], labels=b["labels"]) for b in batches]
    reference = sum(float(o.loss_sum) for o in outs) / sum(float(o.n_targets) for o in outs)
    later = train_steps(engine, layout, env, range(2, 3))
    return {"eval_loss": result["eval_loss"], "reference": reference, "training": engine.model.training,
            "later": later}


CASES = {"nonfinite": case_nonfinite, "meta_init": case_meta_init, "train": case_train, "save": case_save,
         "resume": case_resume, "grad_sync": case_grad_sync, "eval": case_eval,
         "init_from_sharded": case_init_from_sharded}


def worker(rank: int, world: int, port: int, out_dir: str, jobs: list) -> None:
    """Run `jobs` ([key, case name, args] each) in order on every rank; write {key: result or error}."""
    os.environ.update(OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=120))
    env = DistEnv(rank=rank, world_size=world)
    report = {}
    for key, case, args in jobs:
        start = time.perf_counter()
        try:
            report[key] = {"ok": CASES[case](env, args), "s": time.perf_counter() - start}
        except Exception:  # noqa: BLE001 - the parent shows every rank's traceback
            report[key] = {"error": traceback.format_exc()}
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(report, f)
    if dist.is_initialized():
        dist.destroy_process_group()
