"""Fault injection, fast cases: what a cluster does to checkpoints and run directories, in one process.

Each test breaks something the way a week-long job meets it (kill mid-save, dangling `latest`, corrupt newest
checkpoint, full disk, a second run, changed hyperparameters or model) and asserts what the run does next.
Multi-process and kill cases are in test_faults_processes.py (slow).
"""
import errno
import json
import os
import re
import shutil
import socket
import time
from pathlib import Path

import pytest
import torch

from lctrain.config import ConfigError, load_config
from lctrain.train.checkpoint import CheckpointManager, describe_write_error, load_model_weights, resolve_weights
from lctrain.train.checkpoint_select import CheckpointError, select
from lctrain.train.dist import DistEnv
from lctrain.train.errors import CheckpointSaveError
from lctrain.train.loop import Trainer
from lctrain.train.manifest import MANIFEST, verify
from lctrain.train.resume import apply_recipe, recipe_changes
from lctrain.train.run_lock import LOCK_FILE, RunDirBusy, RunLock
from lctrain.train.signals import agree_on_stop
from lctrain.train.watchdog import RankWatch, behind
from tests.train.conftest import ROOT, SMALL, train_losses

STATE = {"tokens": 0, "skipped_steps": 0, "scheduler": {}}


class TinyLM(torch.nn.Module):
    def __init__(self, width: int = 4):
        super().__init__()
        self.proj = torch.nn.Linear(width, width)
        self.lm_head = None


def manager_with(tmp_path, steps, keep_last=5, collective_write=None) -> CheckpointManager:
    model = TinyLM()
    opt = torch.optim.AdamW(model.parameters())
    manager = CheckpointManager(tmp_path, keep_last=keep_last, rank=0, world_size=1)
    for step in steps:
        manager.save(step, model, opt, {"step": step, **STATE}, {"pos": step}, "x: 1\n", barrier=lambda: None,
                     collective_write=collective_write)
    return manager


# ------------------------------------------------------------------------------------------------ manifest
def test_manifest_covers_every_file_including_engine_subdirectories(tmp_path):
    def shards(tmp: Path) -> None:  # what a sharded engine writes through collective_write
        (tmp / "dcp").mkdir()
        (tmp / "dcp" / "__0_0.distcp").write_bytes(b"a" * 100)

    manager_with(tmp_path, [1], collective_write=shards)
    ckpt = tmp_path / "checkpoints" / "step-1"
    manifest = json.loads((ckpt / MANIFEST).read_text())
    assert set(manifest["files"]) == {"dcp/__0_0.distcp", "model.safetensors", "optimizer.pt", "rank-0.pt",
                                      "config.yaml", "trainer.json"}
    assert verify(ckpt) is None
    data = bytearray((ckpt / "dcp" / "__0_0.distcp").read_bytes())
    data[50] ^= 1  # same size, one bit flipped
    (ckpt / "dcp" / "__0_0.distcp").write_bytes(bytes(data))
    assert verify(ckpt) == "dcp/__0_0.distcp does not match its checksum"


@pytest.mark.parametrize("damage, reason", [
    (lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:40]),
     "model.safetensors has 40 bytes"),
    (lambda d: (d / "optimizer.pt").unlink(), "optimizer.pt is missing"),
    (lambda d: (d / "trainer.json").write_text("{garbage"), "trainer.json has"),
    (lambda d: (d / MANIFEST).unlink(), "no manifest.json"),
])
def test_corrupt_newest_checkpoint_falls_back_to_the_previous(tmp_path, damage, reason):
    manager_with(tmp_path, [2, 4])
    damage(tmp_path / "checkpoints" / "step-4")
    chosen = select(tmp_path / "checkpoints")
    assert chosen.path.name == "step-2"
    assert chosen.skipped[0][0] == "step-4" and reason in chosen.skipped[0][1]
    assert chosen.notes()[0].startswith("checkpoint step-4 skipped: ")


@pytest.mark.parametrize("pointer", ["step-99", "", "\x00\xff garbage", None])
def test_latest_is_only_a_hint(tmp_path, pointer):
    manager_with(tmp_path, [2, 4])
    latest = tmp_path / "checkpoints" / "latest"
    if pointer is None:
        latest.unlink()
    else:
        latest.write_bytes(pointer.encode("latin-1"))
    assert select(tmp_path / "checkpoints").path.name == "step-4"


def test_no_usable_checkpoint_stops_with_one_line_naming_them(tmp_path):
    manager_with(tmp_path, [2, 4])
    for step in (2, 4):
        (tmp_path / "checkpoints" / f"step-{step}" / "rank-0.pt").write_bytes(b"")
    with pytest.raises(CheckpointError) as err:
        select(tmp_path / "checkpoints")
    text = str(err.value)
    assert "\n" not in text and "step-4: rank-0.pt has 0 bytes" in text and "step-2: rank-0.pt" in text
    assert "checkpoint.resume=false" in text


def test_dangling_latest_without_any_checkpoint_is_refused_not_restarted(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "latest").write_text("step-7")
    with pytest.raises(CheckpointError, match="names step-7 but there is no checkpoint directory"):
        select(tmp_path / "checkpoints")
    assert select(tmp_path / "elsewhere").path is None  # nothing at all: a fresh start


def test_newest_means_last_written_not_highest_step(tmp_path):
    """An older run left step-50; this run wrote step-2 and step-4 after it: they are the newest."""
    old = manager_with(tmp_path / "old", [50])
    shutil.copytree(old.root / "step-50", tmp_path / "checkpoints" / "step-50")
    manifest = json.loads((tmp_path / "checkpoints" / "step-50" / MANIFEST).read_text())
    assert manifest["generation"] == 1
    manager = manager_with(tmp_path, [2, 4], keep_last=2)
    assert select(manager.root).path.name == "step-4"
    # pruning kept the two newest saves (never the one just written), not the two highest steps
    assert sorted(p.name for p in manager.root.glob("step-*")) == ["step-2", "step-4"]


def test_prune_never_removes_the_resumed_checkpoint_nor_skipped_ones(tmp_path):
    manager = manager_with(tmp_path, [2, 4, 6], keep_last=5)
    (manager.root / "step-6" / "optimizer.pt").unlink()  # the newest is broken
    resumed = CheckpointManager(tmp_path, keep_last=1, rank=0, world_size=1)
    assert resumed.select().path.name == "step-4"
    model = TinyLM()
    resumed.save(5, model, torch.optim.AdamW(model.parameters()), {"step": 5, **STATE}, {}, "x: 1\n",
                 barrier=lambda: None)
    names = sorted(p.name for p in manager.root.glob("step-*"))
    assert names == ["step-4", "step-5", "step-6"]  # just written, resumed from, and the broken one left for the user


def test_export_paths_fall_back_the_same_way(tmp_path, capsys):
    manager_with(tmp_path, [2, 4])
    weights = tmp_path / "checkpoints" / "step-4" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8])
    assert resolve_weights(tmp_path) == tmp_path / "checkpoints" / "step-2" / "model.safetensors"
    assert resolve_weights(tmp_path).parent.name == "step-2"
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "step-4 skipped: model.safetensors has" in err[0] and err[0].endswith("using step-2")


# ------------------------------------------------------------------------------------------------ saving
def test_full_disk_names_step_path_and_cause_and_keeps_latest(tmp_path, monkeypatch):
    manager = manager_with(tmp_path, [1])
    model = TinyLM()
    opt = torch.optim.AdamW(model.parameters())

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr("lctrain.train.checkpoint.save_file", no_space)
    with pytest.raises(CheckpointSaveError) as err:
        manager.save(2, model, opt, {"step": 2, **STATE}, {}, "x: 1\n", barrier=lambda: None)
    assert str(err.value) == (f"saving step 2 to {manager.root / 'step-2'} failed on rank 0: no space left on "
                              "device; latest still names step-1")
    assert (manager.root / "latest").read_text() == "step-1"
    assert not list(manager.root.glob(".tmp-*")) and not (manager.root / "step-2").exists()


def test_torch_save_enforce_failure_is_named_as_a_full_disk(tmp_path, monkeypatch):
    from collections import namedtuple
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10, 10, 0))
    exc = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    assert describe_write_error(exc, tmp_path).startswith("no space left on device (0 bytes free")


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("mount"), reason="a real full disk needs a root tmpfs")
def test_real_full_disk_on_a_small_tmpfs(tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    if os.system(f"mount -t tmpfs -o size=256k tmpfs {mount} 2>/dev/null") != 0:
        pytest.skip("mount not permitted here")
    try:
        manager = manager_with(mount, [1])
        model = TinyLM(width=256)  # 256 KiB of weights: the second save cannot fit
        with pytest.raises(CheckpointSaveError, match="saving step 2 .* no space left on device"):
            manager.save(2, model, torch.optim.AdamW(model.parameters()), {"step": 2, **STATE}, {}, "x: 1\n",
                         barrier=lambda: None)
        assert select(manager.root).path.name == "step-1" and not list(manager.root.glob(".tmp-*"))
    finally:
        os.system(f"umount {mount}")


def test_shape_mismatch_is_one_line_naming_the_first_parameter(tmp_path):
    manager_with(tmp_path, [1])
    with pytest.raises(ValueError) as err:
        load_model_weights(TinyLM(width=6), tmp_path / "checkpoints" / "step-1" / "model.safetensors")
    text = str(err.value)
    assert "\n" not in text and "proj.weight has shape [4, 4] in the checkpoint but [6, 6] in this model " \
                                "(and 1 more)" in text


# ------------------------------------------------------------------------------------------------ run-dir lock
def test_second_run_is_refused_naming_the_holder(tmp_path):
    first = RunLock(tmp_path).acquire()
    try:
        with pytest.raises(RunDirBusy) as err:
            RunLock(tmp_path).acquire()
        assert f"pid {os.getpid()} on host {socket.gethostname()}" in str(err.value)
    finally:
        first.release()
    assert not (tmp_path / LOCK_FILE).exists()
    RunLock(tmp_path).acquire().release()


@pytest.mark.parametrize("holder, age, why", [
    ({"host": socket.gethostname(), "pid": 2**22 + 12345}, 0, "is no longer running on this host"),
    ({"host": "another-node", "pid": 1}, 3600, "its heartbeat is 3600 s old"),
])
def test_stale_lock_is_taken_over_with_a_message(tmp_path, holder, age, why):
    (tmp_path / LOCK_FILE).write_text(json.dumps({"start_time": 0, "heartbeat": time.time() - age, **holder}))
    said = []
    lock = RunLock(tmp_path).acquire(log=said.append)
    assert len(said) == 1 and why in said[0] and said[0].startswith("run.dir: taking over the lock of pid")
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()


def test_live_lock_on_another_host_is_respected(tmp_path):
    (tmp_path / LOCK_FILE).write_text(json.dumps({"host": "another-node", "pid": 1, "start_time": 0,
                                                  "heartbeat": time.time() - 5}))
    with pytest.raises(RunDirBusy, match="pid 1 on host another-node"):
        RunLock(tmp_path).acquire()


def test_heartbeat_keeps_the_lock_fresh(tmp_path):
    lock = RunLock(tmp_path, heartbeat_s=0.05).acquire()
    try:
        first = json.loads((tmp_path / LOCK_FILE).read_text())["heartbeat"]
        time.sleep(0.3)
        assert json.loads((tmp_path / LOCK_FILE).read_text())["heartbeat"] > first
    finally:
        lock.release()


# ------------------------------------------------------------------------------------------------ recipe wins
def test_recipe_wins_for_hyperparameters_and_moments_stay(tmp_path):
    from lctrain.config import TrainConfig
    from lctrain.train.optim import build_optimizer, build_scheduler
    old = TrainConfig(lr=3e-3, beta2=0.95, weight_decay=0.1, steps=10, warmup_steps=2)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    opt, sched = build_optimizer(model, old), build_scheduler(build_optimizer(model, old), old)
    opt = sched.optimizer
    for _ in range(3):
        model(torch.ones(1, 4)).sum().backward()
        opt.step()
        sched.step()
    saved_opt, saved_sched = opt.state_dict(), sched.state_dict()

    new = TrainConfig(lr=1e-4, beta2=0.99, weight_decay=0.0, steps=10, warmup_steps=2)
    opt2 = build_optimizer(model, new)
    sched2 = build_scheduler(opt2, new)
    opt2.load_state_dict(saved_opt)
    sched2.load_state_dict(saved_sched)
    assert opt2.param_groups[0]["lr"] != pytest.approx(1e-4 * 1.0)  # without the fix the old rate comes back
    apply_recipe(opt2, sched2, new)
    from lctrain.train.optim import lr_factor
    assert sched2.get_last_lr()[0] == pytest.approx(1e-4 * lr_factor(3, new))
    assert opt2.param_groups[0]["betas"] == (0.9, 0.99) and opt2.param_groups[0]["weight_decay"] == 0.0
    moments = opt2.state_dict()["state"][0]["exp_avg"]
    assert torch.equal(moments, saved_opt["state"][0]["exp_avg"]) and opt2.state_dict()["state"][0]["step"] == 3
    sched2.step()
    assert sched2.get_last_lr()[0] == pytest.approx(1e-4 * lr_factor(4, new))


def test_recipe_changes_are_printed_once_each(tmp_path):
    from lctrain.config import Config
    saved = Config()
    (tmp_path / "config.yaml").write_text(saved.to_yaml())
    now = Config()
    now.train.lr, now.train.grad_clip = 1e-4, 0.5
    assert recipe_changes(now.train, tmp_path) == ["train.lr: 0.003 -> 0.0001 (from the recipe)",
                                                   "train.grad_clip: 1 -> 0.5 (from the recipe)"]


# ------------------------------------------------------------------------------------------------ hangs, stops
class DictStore:
    def __init__(self):
        self.data = {}

    def set(self, key, value):
        self.data[key] = value.encode()

    def get(self, key):
        return self.data[key]

    def check(self, keys):
        return all(k in self.data for k in keys)


def test_missing_ranks_are_the_silent_and_the_behind():
    now = 1000.0
    beats = {0: (5, 1, now), 1: (5, 1, now - 60), 2: (4, 1, now), 3: (5, 1, now), 4: None}
    assert behind(beats, 5, now, stale_after=10) == [1, 2, 4]


def test_failed_collective_becomes_one_line_naming_the_rank():
    store = DictStore()
    watch0 = RankWatch(0, 2, timeout_s=4, store=store, exit_on_hang=False)
    watch1 = RankWatch(1, 2, timeout_s=4, store=store, exit_on_hang=False)
    watch1.progress(3)
    watch1._publish()  # rank 1 froze at step 3 ...
    watch0.progress(3, 1)
    watch0._publish()  # ... while rank 0 went on to the next collective
    err = watch0.explain(RuntimeError("[gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 4000ms for "
                                      "recv operation to complete"), "step 4")
    assert str(err) == ("step 4: a collective failed or timed out (parallel.timeout_s=4): rank(s) 1 did not arrive "
                        "(Timed out waiting 4000ms for recv operation to complete)")


def test_stop_reason_single_process():
    assert agree_on_stop(None, DistEnv()) is None
    assert agree_on_stop(15, DistEnv()) == "signal 15"


# ------------------------------------------------------------------------------------------------ whole runs
def trainer(run_dir, cache_dir, monkeypatch, *overrides) -> Trainer:
    monkeypatch.setenv("LCTRAIN_CACHE", str(cache_dir))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    cfg = load_config(ROOT / "recipes" / "tiny.yaml", [f"run.dir={run_dir}", *SMALL, "logging.progress=plain",
                                                       "logging.tensorboard=false", *overrides])
    return Trainer(cfg, DistEnv())


def test_corrupt_newest_resumes_from_previous_with_identical_losses(tmp_path, cache_dir, monkeypatch, capsys):
    base = ["train.steps=6", "checkpoint.interval=2", "checkpoint.keep_last=3"]
    trainer(tmp_path / "straight", cache_dir, monkeypatch, *base).run()
    run = tmp_path / "run"
    trainer(run, cache_dir, monkeypatch, *base, "train.stop_at=4").run()
    (run / "checkpoints" / "step-4" / "optimizer.pt").write_bytes(b"\0" * 10)  # torn newest save
    (run / "checkpoints" / "latest").write_text("step-9")  # and a dangling pointer
    capsys.readouterr()
    trainer(run, cache_dir, monkeypatch, *base).run()
    out = capsys.readouterr().out
    assert "checkpoint step-4 skipped: optimizer.pt has 10 bytes" in out
    assert f"resumed from {run / 'checkpoints' / 'step-2'} at step 2" in out
    assert train_losses(run) == train_losses(tmp_path / "straight")  # exact, and every step once


def test_changed_hyperparameters_win_on_resume(tmp_path, cache_dir, monkeypatch, capsys):
    run = tmp_path / "run"
    trainer(run, cache_dir, monkeypatch, "train.steps=4", "train.stop_at=2", "train.schedule=constant",
            "train.warmup_steps=0").run()
    capsys.readouterr()
    trainer(run, cache_dir, monkeypatch, "train.steps=4", "train.schedule=constant", "train.warmup_steps=0",
            "train.lr=1e-4").run()
    out = capsys.readouterr().out
    assert out.count("train.lr: 0.003 -> 0.0001 (from the recipe)") == 1
    lrs = {r["step"]: r["lr"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "lr" in r}
    assert lrs[2] == pytest.approx(3e-3) and lrs[3] == pytest.approx(1e-4) and lrs[4] == pytest.approx(1e-4)


@pytest.mark.parametrize("change, message", [("model.d_model=32", "model.d_model: 32 differs from 64"),
                                             ("data.vocab_size=600", "data.tokenizer: this run's tokenizer differs")])
def test_refused_resume_writes_nothing_in_the_run_dir(tmp_path, cache_dir, monkeypatch, change, message):
    run = tmp_path / "run"
    trainer(run, cache_dir, monkeypatch, "train.steps=2").run()
    before = {p: p.read_bytes() for p in (run / "config.yaml", run / "tokenizer" / "tokenizer.model")}
    changed = trainer(run, cache_dir, monkeypatch, "train.steps=4", change)
    with pytest.raises(ConfigError) as err:
        changed.run()
    assert "\n" not in str(err.value) and message in str(err.value)
    assert {p: p.read_bytes() for p in before} == before
    assert not (run / LOCK_FILE).exists()  # released on the way out


def test_busy_run_dir_is_refused_before_anything_is_written(tmp_path, cache_dir, monkeypatch):
    run = tmp_path / "run"
    held = RunLock(run).acquire()
    try:
        with pytest.raises(RunDirBusy, match="is in use by pid"):
            trainer(run, cache_dir, monkeypatch, "train.steps=2").run()
    finally:
        held.release()
    assert sorted(p.name for p in run.iterdir()) == []


def test_no_checkpoint_during_a_nonfinite_streak(tmp_path, cache_dir, monkeypatch):
    t = trainer(tmp_path / "run", cache_dir, monkeypatch, "train.steps=6", "checkpoint.interval=1",
                "checkpoint.keep_last=10", "train.max_bad_steps=5")
    calls = []
    original = t._forward_sum

    def poisoned(model, batch):
        loss_sum, n = original(model, batch)
        calls.append(1)
        return (loss_sum * float("nan") if len(calls) in (3, 4) else loss_sum), n
    t._forward_sum = poisoned
    assert t.run() == 0
    saved = sorted(int(p.name[5:]) for p in (tmp_path / "run" / "checkpoints").glob("step-*"))
    assert saved == [1, 2, 5, 6]


def test_changed_data_is_refused_unless_reset_data(tmp_path, cache_dir, monkeypatch, capsys):
    run = tmp_path / "run"
    trainer(run, cache_dir, monkeypatch, "train.steps=2").run()
    with pytest.raises(ConfigError, match="train.seed: 7 differs from the checkpoint's 0"):
        trainer(run, cache_dir, monkeypatch, "train.steps=3", "train.seed=7").run()
    assert max(train_losses(run)) == 2
    capsys.readouterr()
    trainer(run, cache_dir, monkeypatch, "train.steps=3", "train.seed=7", "checkpoint.reset_data=true").run()
    assert "checkpoint.reset_data=true: the data starts again from its beginning" in capsys.readouterr().out
    assert sorted(train_losses(run)) == [1, 2, 3]


def test_fresh_start_keeps_earlier_metrics_aside(tmp_path, cache_dir, monkeypatch, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n{"step": 2, "loss": 8.0}\n')  # no checkpoint
    trainer(run, cache_dir, monkeypatch, "train.steps=2").run()
    assert "the earlier metrics.jsonl was moved to metrics.before-" in capsys.readouterr().out
    assert sorted(train_losses(run)) == [1, 2] and train_losses(run)[1] != 9.0
    assert len(list(run.glob("metrics.before-*.jsonl"))) == 1


def test_a_rank_that_makes_no_progress_ends_itself_with_one_line():
    import subprocess
    import sys
    script = ("import time\nfrom lctrain.train.watchdog import RankWatch\n"
              "RankWatch(1, 2, timeout_s=0.5, store=None).start().progress(6)\ntime.sleep(30)\n")
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 1, proc.stderr
    # the stall it reports is measured in the process: the timeout plus the grace, give or take a heartbeat
    assert re.fullmatch(r"error: training aborted: rank 1 made no progress for [2-5] s at step 7 "
                        r"\(parallel.timeout_s=0.5 plus 2 s grace\): no rank is known to be missing",
                        proc.stderr.strip()), proc.stderr
