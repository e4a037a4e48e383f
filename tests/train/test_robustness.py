"""Non-finite steps, atomic checkpoint writes, weights-only starts, dry runs and launcher arguments."""
import json
import math
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from lctrain.config import load_config
from lctrain.train.checkpoint import CheckpointManager
from lctrain.train.dist import DistEnv
from lctrain.train.errors import CheckpointSaveError
from lctrain.train.loop import Trainer, TrainingAborted
from tests.train.conftest import ROOT, SMALL, child_env, run_lctrain, train_losses


def make_trainer(tmp_path, cache_dir, monkeypatch, *overrides) -> Trainer:
    monkeypatch.setenv("LCTRAIN_CACHE", str(cache_dir))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    cfg = load_config(ROOT / "recipes" / "tiny.yaml",
                      [f"run.dir={tmp_path / 'run'}", *SMALL, "logging.progress=none", *overrides])
    return Trainer(cfg, DistEnv())


def poison_steps(trainer: Trainer, bad_steps: set[int]) -> list[int]:
    """Make the loss NaN on the given (1-based) optimizer steps; returns the list of steps seen."""
    seen = []
    original = trainer._forward_sum

    def forward_sum(model, batch):
        loss_sum, n = original(model, batch)
        step = len(seen) + 1
        seen.append(step)
        if step in bad_steps:
            loss_sum = loss_sum * float("nan")
        return loss_sum, n
    trainer._forward_sum = forward_sum
    return seen


def test_nonfinite_steps_are_skipped_and_counted(tmp_path, cache_dir, monkeypatch):
    trainer = make_trainer(tmp_path, cache_dir, monkeypatch, "train.steps=6", "train.max_bad_steps=3")
    poison_steps(trainer, {2, 3})
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    assert trainer.run() == 0
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    assert train[1]["loss"] is None and train[2]["loss"] is None  # NaN is written as null
    assert train[-1]["skipped_steps"] == 2
    weights = load_file(str(tmp_path / "run" / "checkpoints" / "step-6" / "model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert any(not torch.equal(before[k], trainer.model.state_dict()[k]) for k in before)


def test_too_many_nonfinite_steps_abort_without_saving_them(tmp_path, cache_dir, monkeypatch):
    trainer = make_trainer(tmp_path, cache_dir, monkeypatch, "train.steps=10", "train.max_bad_steps=2",
                           "checkpoint.interval=2")
    poison_steps(trainer, {3, 4, 5, 6})
    with pytest.raises(TrainingAborted, match="2 non-finite steps in a row"):
        trainer.run()
    ckpts = tmp_path / "run" / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step-2"
    weights = load_file(str(ckpts / "step-2" / "model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_failed_save_keeps_previous_latest(tmp_path):
    model = torch.nn.Linear(4, 4)
    model.lm_head = None
    opt = torch.optim.AdamW(model.parameters())
    manager = CheckpointManager(tmp_path, keep_last=3, rank=0, world_size=1)
    manager.save(1, model, opt, {"step": 1, "tokens": 0, "skipped_steps": 0, "scheduler": {}}, {"pos": 1},
                 "x: 1\n", barrier=lambda: None)

    class Boom(RuntimeError):
        pass

    def failing_state_dict():
        raise Boom("disk full")
    opt.state_dict = failing_state_dict
    with pytest.raises(CheckpointSaveError, match=r"saving step 2 to .*step-2 failed on rank 0: Boom: disk full; "
                                                  r"latest still names step-1"):
        manager.save(2, model, opt, {"step": 2, "tokens": 0, "skipped_steps": 0, "scheduler": {}}, {"pos": 2},
                     "x: 1\n", barrier=lambda: None)
    assert manager.latest().name == "step-1"
    assert not (tmp_path / "checkpoints" / "step-2").exists()
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))  # the partial files went with the failure


def test_init_from_loads_weights_only(tmp_path, cache_dir):
    source = tmp_path / "source"
    run_lctrain(cache_dir, source, "train.steps=3")
    target = tmp_path / "target"
    run_lctrain(cache_dir, target, "train.steps=1", "train.lr=1e-9", "train.warmup_steps=0",
                f"checkpoint.init_from={source}")
    a = load_file(str(source / "checkpoints" / "step-3" / "model.safetensors"))
    b = load_file(str(target / "checkpoints" / "step-1" / "model.safetensors"))
    # one step at lr 1e-9 from the source weights: equal to ~1e-7, far from a fresh init
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert train_losses(target)[1] < train_losses(source)[1]


def test_init_from_missing_path_is_a_config_error(tmp_path, cache_dir):
    proc = subprocess.run([sys.executable, "-m", "lctrain", "recipes/tiny.yaml", f"run.dir={tmp_path}", *SMALL,
                           f"checkpoint.init_from={tmp_path / 'nothing'}"], cwd=ROOT, env=child_env(cache_dir),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "checkpoint.init_from" in proc.stderr and "Traceback" not in proc.stderr


def test_dry_run_prints_plan_and_ignores_local_rank(tmp_path, cache_dir):
    proc = subprocess.run([sys.executable, "-m", "lctrain", "--local_rank=0", "recipes/tiny.yaml", "--dry-run",
                           f"run.dir={tmp_path / 'run'}", *SMALL, "train.tokens_per_step=512"],  # flags anywhere
                          cwd=ROOT, env=child_env(cache_dir), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for fragment in ("parameters:", "pattern GA", "tokens per step: 512 (gradient accumulation 2)",
                     "activation memory"):
        assert fragment in proc.stdout, fragment
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_tokens_per_step_must_divide(tmp_path, cache_dir):
    proc = subprocess.run([sys.executable, "-m", "lctrain", "recipes/tiny.yaml", f"run.dir={tmp_path}", *SMALL,
                           "train.tokens_per_step=300", "--dry-run"], cwd=ROOT, env=child_env(cache_dir),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "train.tokens_per_step: 300" in proc.stderr


def test_gradient_accumulation_normalises_by_all_targets(tmp_path, cache_dir, monkeypatch):
    """One step of 2 micro-batches of 4 equals one step of a micro-batch of 8 (same windows, same update)."""
    # With eps >> |g| AdamW's first update is lr * g / eps = g: the parameters then show the gradient itself.
    linear_update = ["train.steps=1", "train.eps=1e4", "train.lr=1e4", "train.warmup_steps=0",
                     "train.weight_decay=0", "train.grad_clip=0"]
    t1 = make_trainer(tmp_path / "a", cache_dir, monkeypatch, *linear_update, "train.micro_batch_size=8")
    t2 = make_trainer(tmp_path / "b", cache_dir, monkeypatch, *linear_update, "train.micro_batch_size=4",
                      "train.tokens_per_step=512")
    initial = {k: v.clone() for k, v in t1.model.named_parameters()}
    assert t1.run() == 0 and t2.run() == 0
    la = train_losses(tmp_path / "a" / "run")[1]
    lb = train_losses(tmp_path / "b" / "run")[1]
    assert math.isclose(la, lb, rel_tol=1e-5)
    for (name, p1), p2 in zip(t1.model.named_parameters(), t2.model.parameters()):
        moved = (p1 - initial[name]).abs().max()
        assert moved > 1e-6, name  # the step did change the weights
        assert torch.allclose(p1, p2, atol=1e-6 + 1e-4 * float(moved)), name
