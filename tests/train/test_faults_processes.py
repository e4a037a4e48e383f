"""Fault injection across processes (slow): frozen rank, a signal to one rank, two runs on one run dir, kill -9.

The whole matrix, with a table, is `python bench/faults.py`.
"""
import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.train.conftest import ROOT, child_env, lctrain_cmd, run_lctrain, train_losses

pytestmark = pytest.mark.slow


def start(cache_dir, run, *overrides, nproc=1) -> subprocess.Popen:
    return subprocess.Popen(lctrain_cmd(run, *overrides, nproc=nproc), cwd=ROOT, env=child_env(cache_dir),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def wait_for_step(run: Path, step: int, proc, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, f"training exited early: {proc.communicate()}"
        path = run / "metrics.jsonl"
        if path.is_file():
            steps = [json.loads(x)["step"] for x in path.read_text().splitlines() if x.endswith("}")]
            if steps and max(steps) >= step:
                return
        time.sleep(0.05)
    raise AssertionError("training did not reach the step in time")


def worker_pid(parent: int, rank: int) -> int:
    """The torchrun worker of `rank` (its environment says RANK=<rank>)."""
    for child in Path("/proc").iterdir():
        if not child.name.isdigit():
            continue
        try:
            ppid = int((child / "stat").read_text().split()[3])
            environ = (child / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if ppid == parent and f"RANK={rank}".encode() in environ:
            return int(child.name)
    raise AssertionError(f"no worker with RANK={rank} under pid {parent}")


def test_frozen_rank_ends_the_job_naming_it(cache_dir, tmp_path):
    run = tmp_path / "run"
    proc = start(cache_dir, run, "train.steps=100000", "parallel.timeout_s=5", nproc=2)
    victim = None
    try:
        wait_for_step(run, 3, proc)
        victim = worker_pid(proc.pid, 1)
        os.kill(victim, signal.SIGSTOP)
        t0 = time.time()
        out, err = proc.communicate(timeout=180)
        took = time.time() - t0
    finally:
        if victim is not None:
            try:
                os.kill(victim, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0
    line = next(x for x in err.splitlines() if "did not arrive" in x)
    assert "parallel.timeout_s=5" in line and "rank(s) 1 did not arrive" in line, line
    assert "Traceback" not in err.split(line)[0][-2000:]
    # the timeout, the heartbeat check and torchrun's 30 s teardown of the stopped worker, with room for a busy box
    assert took < 5 + 5 + 30 + 40, took


def test_signal_to_one_rank_stops_every_rank_with_the_right_reason(cache_dir, tmp_path):
    run = tmp_path / "run"
    proc = start(cache_dir, run, "train.steps=100000", "checkpoint.interval=0", nproc=2)
    try:
        wait_for_step(run, 2, proc)
        os.kill(worker_pid(proc.pid, 1), signal.SIGUSR1)
        out, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, err[-3000:]
    line = next(x for x in out.splitlines() if "stopped (" in x)
    assert f"stopped (signal {int(signal.SIGUSR1)} on rank 1): checkpoint saved at step" in line, line


def test_second_run_on_a_busy_run_dir_exits_2_and_the_first_is_unaffected(cache_dir, tmp_path):
    straight, run = tmp_path / "straight", tmp_path / "run"
    constant = ["train.schedule=constant", "checkpoint.interval=1"]  # the lr does not depend on train.steps
    run_lctrain(cache_dir, straight, "train.steps=4", *constant)
    first = start(cache_dir, run, "train.steps=100000", *constant)
    try:
        wait_for_step(run, 1, first)
        second = subprocess.run(lctrain_cmd(run, "train.steps=100000", *constant), cwd=ROOT,
                                env=child_env(cache_dir), capture_output=True, text=True, timeout=180)
        wait_for_step(run, 4, first)
        first.send_signal(signal.SIGTERM)
        out, err = first.communicate(timeout=180)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    lines = [x for x in second.stderr.splitlines() if x.strip()]
    assert second.returncode == 2 and len(lines) == 1, second.stderr
    assert lines[0].startswith(f"error: run.dir: {run} is in use by pid {first.pid} on host"), lines[0]
    assert first.returncode == 0, err[-3000:]
    ours, reference = train_losses(run), train_losses(straight)
    assert {k: ours[k] for k in reference} == reference  # the first run went on undisturbed
    steps = [r["step"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert steps == sorted(set(steps))  # no step written twice


def test_kill9_at_random_moments_then_resume_matches_an_uninterrupted_run(cache_dir, tmp_path):
    straight, run = tmp_path / "straight", tmp_path / "run"
    steps = ["train.steps=8", "checkpoint.interval=1", "checkpoint.keep_last=2"]
    run_lctrain(cache_dir, straight, *steps)
    rng = random.Random(1)
    for _ in range(3):
        done = max(train_losses(run), default=0) if (run / "metrics.jsonl").is_file() else 0
        proc = start(cache_dir, run, *steps)
        try:
            wait_for_step(run, done + 1, proc)
            time.sleep(rng.uniform(0, 0.5))  # a save takes a large share of these tiny steps
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    proc = run_lctrain(cache_dir, run, *steps)
    assert "resumed from" in proc.stdout
    assert train_losses(run) == train_losses(straight)  # exact, every step once
    assert not list((run / "checkpoints").glob(".tmp-*"))
