"""train.engine=deepspeed on CPU (gloo, 2 processes): ZeRO 1/2/3 train, save lctrain-layout checkpoints and
resume bit-identically; the loss equals DDP's; the `deepspeed` launcher works; bad configs are one line.

The first DeepSpeed run on a machine JIT-builds a small shared-memory comm op (about a minute on 2 cores)."""
import json
import subprocess
import sys

import pytest

from tests.train.conftest import ROOT, SMALL, child_env, free_port, run_lctrain, train_losses

pytest.importorskip("deepspeed")

# 2 micro-batches per step, so DeepSpeed's gradient accumulation is exercised too.
STEPS = ["train.steps=6", "train.tokens_per_step=1024", "data.max_documents=12", "train.eval_batches=2"]


def ds_env(cache_dir) -> dict:
    env = child_env(cache_dir)
    env.pop("DS_ACCELERATOR", None)  # lctrain sets it from the device it trains on
    return env


def run_ds(cache_dir, run, *overrides, timeout=300):
    return run_lctrain(cache_dir, run, *STEPS, "train.engine=deepspeed", *overrides, nproc=2, timeout=timeout)


def launch_ds(cache_dir, run, *overrides) -> subprocess.CompletedProcess:
    """`deepspeed --num_gpus 2 --module lctrain ...`: DeepSpeed's own launcher."""
    cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), "--module", "lctrain",
           "recipes/tiny.yaml", f"run.dir={run}", *SMALL, *STEPS, "train.engine=deepspeed", *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, env=ds_env(cache_dir), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def zero3_straight(cache_dir, tmp_path_factory):
    """Six ZeRO-3 steps without a break, through DeepSpeed's launcher: the reference of both tests below."""
    run = tmp_path_factory.mktemp("zero3")
    launch_ds(cache_dir, run, "deepspeed.zero_stage=3")
    return run


# ZeRO-3 (partitioned parameters, the hardest case) runs by default; stages 1 and 2 with -m slow
@pytest.mark.parametrize("stage", [pytest.param(1, marks=pytest.mark.slow), pytest.param(2, marks=pytest.mark.slow), 3])
def test_zero_stage_trains_and_resumes_bit_identically(cache_dir, tmp_path, stage, request):
    zero = f"deepspeed.zero_stage={stage}"
    if stage == 3:
        straight = request.getfixturevalue("zero3_straight")
    else:
        straight = tmp_path / "straight"
        run_ds(cache_dir, straight, zero)
    split = tmp_path / "split"
    run_ds(cache_dir, split, zero, "train.stop_at=3")
    assert max(train_losses(split)) == 3
    step3 = split / "checkpoints" / "step-3"
    for name in ("model.safetensors", "trainer.json", "rank-0.pt", "rank-1.pt", "config.yaml", "deepspeed"):
        assert (step3 / name).exists(), name
    assert not list((split / "checkpoints").glob(".tmp-*"))
    proc = run_ds(cache_dir, split, zero)
    assert "resumed from" in proc.stdout
    a, b = train_losses(straight), train_losses(split)
    assert sorted(a) == list(range(1, 7)) and a == b  # exact float equality
    assert (split / "checkpoints" / "latest").read_text().strip() == "step-6"


def test_deepspeed_loss_matches_ddp_and_the_launcher_works(cache_dir, tmp_path, zero3_straight):
    """Same data, same init: the loss normalisation (global target tokens) is the DDP engine's, and the first
    step (before any update) is bit-identical. The ZeRO-3 run was launched with `deepspeed --module lctrain`."""
    ddp = tmp_path / "ddp"
    run_lctrain(cache_dir, ddp, *STEPS, nproc=2)
    a, b = train_losses(ddp), train_losses(zero3_straight)
    assert a[1] == b[1]
    assert all(abs(a[s] - b[s]) < 1e-5 for s in a)


def test_contradicting_deepspeed_json_is_one_line(cache_dir, tmp_path):
    config = tmp_path / "ds.json"
    config.write_text(json.dumps({"train_micro_batch_size_per_gpu": 16, "zero_optimization": {"stage": 2}}))
    cmd = [sys.executable, "-m", "lctrain", "recipes/tiny.yaml", f"run.dir={tmp_path / 'run'}", *SMALL,
           "train.engine=deepspeed", f"deepspeed.config={config}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=ds_env(cache_dir), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: deepspeed.config: {config} sets train_micro_batch_size_per_gpu=16, but the recipe implies 4 "
        "(from train.micro_batch_size / tokens_per_step / grad_clip); remove it")
    assert "Traceback" not in proc.stderr


@pytest.mark.slow  # ~15 s; DeepSpeed and SP each have default tests of their own
def test_deepspeed_with_sequence_parallel_matches_one_process(cache_dir, tmp_path):
    """ZeRO-2 over a world that is one SP group of 2: same losses as a single process on the whole sequence."""
    model = ["model.pattern=GGGA", "model.n_layers=4", "train.steps=3", "checkpoint.interval=0",
             "train.eval_batches=0"]
    ref, run = tmp_path / "ref", tmp_path / "run"
    run_lctrain(cache_dir, ref, *model)
    run_lctrain(cache_dir, run, *model, "train.engine=deepspeed", "deepspeed.zero_stage=2", "parallel.sp=2",
                "parallel.layout=zigzag", nproc=2, timeout=300)
    a, b = train_losses(ref), train_losses(run)
    assert sorted(a) == sorted(b) == [1, 2, 3]
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=2e-6, abs=1e-6), step
