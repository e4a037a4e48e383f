"""Spawned gloo ranks for `checkpoint.init_from: hf:DIR` under fsdp (tests/train/test_meta_source.py): the meta
model reads each rank's shards straight from the Hugging Face safetensors files, never the whole model."""
from __future__ import annotations

import contextlib
import datetime
import json
import os
import traceback

import torch
import torch.distributed as dist

from lctrain.config import load_config
from lctrain.models import LanguageModel
from lctrain.models.init import parameters_on_meta
from lctrain.train.dist import DistEnv
from lctrain.train.engine import build_engine
from lctrain.train.loop import plan_layout
from tests.train.fsdp_cases import ROWS, SEQ, VOCAB, full_weights, train_steps

LORA = ["lora.enabled=true", "lora.r=4", "lora.target_modules=[q_proj,v_proj,down]"]


def make_cfg(engine: str, hf_dir: str, lora: bool):
    from lctrain.export.hf_import import follow_hf_config
    cfg = load_config(None, [f"train.engine={engine}", "train.dtype=float32", f"data.seq_len={SEQ}",
                             "train.micro_batch_size=1", f"train.tokens_per_step={ROWS * SEQ}", "train.lr=1e-2",
                             "train.warmup_steps=1", "train.steps=2", f"checkpoint.init_from=hf:{hf_dir}",
                             *(LORA if lora else [])])
    follow_hf_config(cfg.model, hf_dir)
    assert cfg.model.vocab_size == VOCAB
    return cfg


@contextlib.contextmanager
def whole_load_refused():
    """The host path's loaders raise while the fsdp model is built: it must never load the checkpoint whole."""
    import lctrain.export.hf_import as hf_import
    saved = hf_import.load_hf_weights, hf_import.read_hf_tensors

    def whole_load(*args, **kwargs):
        raise AssertionError("the fsdp path loaded the whole HF checkpoint on the host")
    hf_import.load_hf_weights = hf_import.read_hf_tensors = whole_load
    try:
        yield
    finally:
        hf_import.load_hf_weights, hf_import.read_hf_tensors = saved


def one_case(env, hf_dir: str, lora: bool) -> dict:
    from lctrain.export.hf_import import load_hf_weights
    from lctrain.train.lora import apply_lora
    from lctrain.train.meta_source import check, open_source
    source = f"hf:{hf_dir}"
    # ddp reference: the whole checkpoint loaded on the host (the function the fsdp path must never call)
    cfg = make_cfg("ddp", hf_dir, lora)
    torch.manual_seed(cfg.train.seed)
    eager = LanguageModel(cfg.model)
    load_hf_weights(eager, hf_dir)
    if lora:
        eager = apply_lora(eager, cfg.lora)
    ddp = build_engine(eager, cfg, env, plan_layout(cfg, env))
    want = {n: p.detach().clone() for n, p in ddp.module.named_parameters()}
    ddp_loss = train_steps(ddp, plan_layout(cfg, env), env, [0])
    ddp_after = {n: p.detach().clone() for n, p in ddp.module.named_parameters()}

    cfg = make_cfg("fsdp", hf_dir, lora)
    torch.manual_seed(cfg.train.seed)
    with whole_load_refused():
        with parameters_on_meta():
            model = LanguageModel(cfg.model)
        reader = open_source(source)
        check(model, reader)
        model._init_source = reader
        if lora:
            with parameters_on_meta():
                model = apply_lora(model, cfg.lora)
        layout = plan_layout(cfg, env)
        fsdp = build_engine(model, cfg, env, layout)
    got = full_weights(fsdp)
    assert sorted(got) == sorted(want), sorted(set(got) ^ set(want))
    unequal = [n for n in want if not torch.equal(got[n], want[n])]
    read = reader.bytes_read
    fsdp_loss = train_steps(fsdp, layout, env, [0])
    after = full_weights(fsdp)
    step_diff = max((after[n] - ddp_after[n]).abs().max().item() for n in ddp_after)
    return {"unequal": unequal, "bytes_read": read, "ddp_loss": ddp_loss, "fsdp_loss": fsdp_loss,
            "step_diff": step_diff}


def worker(rank: int, world: int, port: int, out_dir: str, hf_dir: str) -> None:
    os.environ.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    env = DistEnv(rank=rank, world_size=world)
    report = {}
    for lora in (False, True):
        try:
            report["lora" if lora else "plain"] = one_case(env, hf_dir, lora)
        except Exception:  # noqa: BLE001 - the parent shows every rank's traceback
            report["lora" if lora else "plain"] = {"error": traceback.format_exc()}
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(report, f)
    dist.destroy_process_group()
