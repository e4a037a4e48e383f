"""End-to-end training through the CLI: run directory contents, falling loss, exact resume, preemption."""
import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.train.conftest import ROOT, child_env, lctrain_cmd, read_metrics, run_lctrain, train_losses


def test_tiny_recipe_trains_and_writes_run_dir(cache_dir, tmp_path):
    run = tmp_path / "run"
    run_lctrain(cache_dir, run, "train.steps=40", "train.lr=5e-3", "train.eval_interval=20",
                "checkpoint.interval=20")
    records = read_metrics(run)
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == list(range(1, 41))
    for key in ("step", "loss", "lr", "tokens", "grad_norm", "tokens_per_s"):
        assert key in train[0], key
    assert train[0]["world_size"] == 1 and train[0]["dp"] == 1 and train[0]["sp"] == 1
    assert train[-1]["tokens"] == 40 * 4 * 64
    evals = [r for r in records if "eval_loss" in r]
    assert evals and all(r["eval_ppl"] > 1 for r in evals)
    first = sum(r["loss"] for r in train[:5]) / 5
    last = sum(r["loss"] for r in train[-5:]) / 5
    assert last < first - 0.5, (first, last)
    assert list((run / "tb").glob("events.out.tfevents.*"))
    assert (run / "config.yaml").is_file()
    ckpts = run / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step-40"
    assert sorted(p.name for p in ckpts.iterdir() if p.is_dir()) == ["step-20", "step-40"]
    for name in ("model.safetensors", "optimizer.pt", "trainer.json", "rank-0.pt", "config.yaml"):
        assert (ckpts / "step-40" / name).is_file(), name
    state = json.loads((ckpts / "step-40" / "trainer.json").read_text())
    assert state["step"] == 40 and state["tokens"] == 40 * 4 * 64


# 2 processes: ~20 s, slow; a 2-rank resume is also in tests/data/test_elastic_resume.py
@pytest.mark.parametrize("nproc", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_resume_is_bit_identical(cache_dir, tmp_path, nproc):
    steps = ["train.steps=8", "train.schedule=cosine", "data.max_documents=12"]  # small data: crosses an epoch
    straight, split = tmp_path / "straight", tmp_path / "split"
    run_lctrain(cache_dir, straight, *steps, nproc=nproc)
    run_lctrain(cache_dir, split, *steps, "train.stop_at=4", nproc=nproc)
    assert max(train_losses(split)) == 4
    proc = run_lctrain(cache_dir, split, *steps, nproc=nproc)
    assert "resumed from" in proc.stdout
    a, b = train_losses(straight), train_losses(split)
    assert sorted(a) == sorted(b) == list(range(1, 9))
    assert a == b  # exact float equality, step by step
    wa = load_file(str(straight / "checkpoints" / "step-8" / "model.safetensors"))
    wb = load_file(str(split / "checkpoints" / "step-8" / "model.safetensors"))
    assert all((wa[k] == wb[k]).all() for k in wa)


@pytest.mark.slow  # ~12 s; per-source batching itself is checked in tests/data
def test_per_source_batching_with_accumulation_resumes_bit_identically(cache_dir, tmp_path):
    sources = ", ".join(f"{{type: mqar, num_kv_pairs: {n}, task_vocab: 16, num_examples: 60, seed: {n}}}"
                        for n in (2, 4, 6))
    steps = ["train.steps=5", f"data.sources=[{sources}]", "data.batching=per_source",
             "train.tokens_per_step=512"]  # 2 micro-batches of 4 x 64 per step
    straight, split = tmp_path / "straight", tmp_path / "split"
    run_lctrain(cache_dir, straight, *steps)
    run_lctrain(cache_dir, split, *steps, "train.stop_at=2")
    assert "resumed from" in run_lctrain(cache_dir, split, *steps).stdout
    assert train_losses(straight) == train_losses(split)  # exact, step by step
    assert len(train_losses(straight)) == 5


def _wait_for_step(run: Path, step: int, proc, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"training exited early: {proc.communicate()}")
        path = run / "metrics.jsonl"
        if path.is_file():
            steps = [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()
                     and line.endswith("}")]
            if steps and max(steps) >= step:
                return
        time.sleep(0.2)
    raise AssertionError("training did not reach the step in time")


@pytest.mark.parametrize("signum", [signal.SIGTERM, pytest.param(signal.SIGUSR1, marks=pytest.mark.slow)])
def test_preemption_signal_saves_and_exits_zero(cache_dir, tmp_path, signum):
    run = tmp_path / "run"
    proc = subprocess.Popen(lctrain_cmd(run, "train.steps=100000", "checkpoint.interval=0"), cwd=ROOT,
                            env=child_env(cache_dir), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_step(run, 3, proc)
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-2000:]
    latest = (run / "checkpoints" / "latest").read_text().strip()
    saved = int(latest.split("-")[1])
    assert saved >= 3 and max(train_losses(run)) == saved
    assert "stopped (signal" in out
    # the saved run continues from where it stopped
    run_lctrain(cache_dir, run, f"train.steps={saved + 2}", "checkpoint.interval=0")
    assert max(train_losses(run)) == saved + 2


def test_kill9_never_leaves_latest_incomplete(cache_dir, tmp_path):
    run = tmp_path / "run"
    for delay in (0.05, 0.35, 0.8):  # seconds after a checkpoint was last listed
        proc = subprocess.Popen(lctrain_cmd(run, "train.steps=100000", "checkpoint.interval=1",
                                            "checkpoint.keep_last=2"),
                                cwd=ROOT, env=child_env(cache_dir), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        try:
            _wait_for_step(run, 2, proc)
            time.sleep(delay)
        finally:
            proc.kill()  # SIGKILL: no handler runs
            proc.wait()
        latest = (run / "checkpoints" / "latest").read_text().strip()
        ckpt = run / "checkpoints" / latest
        weights = load_file(str(ckpt / "model.safetensors"))
        assert weights and json.loads((ckpt / "trainer.json").read_text())["step"] == int(latest.split("-")[1])
    # and the run resumes cleanly, leaving no temporary directories behind
    step = int((run / "checkpoints" / "latest").read_text().strip().split("-")[1])
    run_lctrain(cache_dir, run, f"train.steps={step + 1}", "checkpoint.interval=1")
    assert not list((run / "checkpoints").glob(".tmp-*"))


def _compile_vs_eager(cache_dir, tmp_path, nproc):
    common = ["train.steps=4", "model.pattern=GLSA", "model.n_layers=4", "model.activation_checkpointing=true",
              "model.mixers={gdn: {head_k_dim: 16, head_v_dim: 32}, swa: {window: 16}}"]
    run_lctrain(cache_dir, tmp_path / "eager", *common, nproc=nproc)
    proc = run_lctrain(cache_dir, tmp_path / "compiled", *common, "model.compile=true",
                       "model.compile_backend=aot_eager", nproc=nproc)
    eager, compiled = train_losses(tmp_path / "eager"), train_losses(tmp_path / "compiled")
    assert sorted(eager) == sorted(compiled) == [1, 2, 3, 4]
    for step in eager:
        assert abs(compiled[step] - eager[step]) <= 1e-3 * abs(eager[step]), (step, compiled, eager)
    out = proc.stdout + proc.stderr
    assert out.count("model.compile: 4 blocks compiled (aot_eager)") == 1, out[-2000:]


@pytest.mark.slow
def test_compiled_blocks_train_like_eager_with_checkpointing(cache_dir, tmp_path):
    """`model.compile: true` (every block compiled, activation checkpointing on): 4 steps equal eager within 1e-3
    relative; the compile time is printed once."""
    _compile_vs_eager(cache_dir, tmp_path, 1)


@pytest.mark.slow
def test_compiled_blocks_train_like_eager_under_ddp(cache_dir, tmp_path):
    """The same under DDP (2 processes, gloo)."""
    _compile_vs_eager(cache_dir, tmp_path, 2)
