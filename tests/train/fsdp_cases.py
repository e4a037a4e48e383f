"""Engine-level cases for the FSDP tests, run in spawned gloo processes (no data pipeline, no CLI start-up).

Every case trains a small LanguageModel on fixed random global batches: rank r of W takes rows r, r + W, ... of
each step's batch, so any world size sees the same global step and its losses can be compared.
"""
from __future__ import annotations

import datetime
import json
import math
import os
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


def build(cfg, env, meta: bool):
    torch.manual_seed(cfg.train.seed)
    if meta:
        with parameters_on_meta():
            model = LanguageModel(cfg.model)
    else:
        model = LanguageModel(cfg.model)
    layout = plan_layout(cfg, env)
    return build_engine(model, cfg, env, layout), layout


def global_batch(step: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1000 + step % 2)  # two batches, alternating: the loss falls
    return torch.randint(0, VOCAB, (ROWS, SEQ + 1), generator=gen)


def train_steps(engine, layout, env, steps) -> list[float]:
    """The loop's protocol (micro_step / backward with world / n_global / step) on fixed global batches."""
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
            total += out.loss_sum.detach().double()
        if env.distributed:
            dist.all_reduce(total)
        engine.step(total.item() / n_global)
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


def case_train(env, args):
    """Losses of 6 steps (2 micro-batches per step where the rows allow), and the final weights' checksum."""
    cfg = make_cfg(args["engine"], env.world_size, args.get("extra", ()))
    engine, layout = build(cfg, env, meta=args["engine"] == "fsdp")
    losses = train_steps(engine, layout, env, range(6))
    weights = full_weights(engine)
    return {"losses": losses, "weights": {k: v.double().sum().item() for k, v in weights.items()}}


def case_save(env, args):
    """Train 3 steps, save (sync or async) at step 3, then train 3 more: the reference for case_resume."""
    cfg = make_cfg("fsdp", env.world_size, [f"checkpoint.async_save={args['async']}"])
    engine, layout = build(cfg, env, meta=True)
    ckpt = CheckpointManager(args["run"], 2, env.rank, env.world_size)
    first = train_steps(engine, layout, env, range(3))
    engine.save(ckpt, 3, {"step": 3, "scheduler": engine.scheduler.state_dict()}, {"position": 3}, "",
                lambda: dist.barrier() if env.distributed else None)
    rest = train_steps(engine, layout, env, range(3, 6))  # overlaps the background write when async
    engine.finish_saves()
    return {"losses": first + rest, "latest": (Path(args["run"]) / "checkpoints" / "latest").read_text()}


def case_resume(env, args):
    cfg = make_cfg("fsdp", env.world_size)
    engine, layout = build(cfg, env, meta=True)
    ckpt = CheckpointManager(args["run"], 2, env.rank, env.world_size)
    state, data = engine.load(ckpt, ckpt.latest())
    engine.scheduler.load_state_dict(state["scheduler"])
    return {"losses": train_steps(engine, layout, env, range(state["step"], 6)), "data": data}


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


CASES = {"nonfinite": case_nonfinite, "meta_init": case_meta_init, "train": case_train, "save": case_save, "resume": case_resume}


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
        try:
            report[key] = {"ok": CASES[case](env, args)}
        except Exception:  # noqa: BLE001 - the parent shows every rank's traceback
            report[key] = {"error": traceback.format_exc()}
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(report, f)
    if dist.is_initialized():
        dist.destroy_process_group()
