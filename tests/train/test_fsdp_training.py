"""`train.engine=fsdp` end to end through the CLI: against ddp with sequence parallelism, resume on another world
size, kill -9 during a background save, and export / load_model / eval of sharded checkpoints. Each test starts
several multi-process runs, so all are slow."""
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import lctrain
from tests.train.conftest import ROOT, child_env, lctrain_cmd, read_metrics, run_lctrain, train_losses

pytestmark = pytest.mark.slow

# The global batch is fixed (4 sequences of 64: 4, 2 or 1 micro-batches per rank at 1, 2 or 4 ranks): any world size takes the same windows per step.
GLOBAL = ["train.micro_batch_size=1", "train.tokens_per_step=256", "train.dtype=float32"]


def close(a: dict, b: dict, rel: float) -> bool:
    return sorted(a) == sorted(b) and all(math.isclose(a[k], b[k], rel_tol=rel) for k in a)


def _export_fp32(cache_dir, run, out):
    """`python -m lctrain export RUN OUT --dtype float32`; returns OUT."""
    proc = subprocess.run([sys.executable, "-m", "lctrain", "export", str(run), str(out), "--dtype", "float32"],
                          cwd=ROOT, env=child_env(cache_dir), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_fsdp_with_sp_2x2_equals_ddp(cache_dir, tmp_path):
    """4 ranks as 2 data shards x SP groups of 2 (GDN state passing + attention all-gather): same losses."""
    args = ["train.steps=4", "parallel.sp=2", "model.pattern=GA", *GLOBAL]
    run_lctrain(cache_dir, tmp_path / "ddp", *args, nproc=4, timeout=600)
    run_lctrain(cache_dir, tmp_path / "fsdp", *args, "train.engine=fsdp", nproc=4, timeout=600)
    a, b = train_losses(tmp_path / "ddp"), train_losses(tmp_path / "fsdp")
    assert len(a) == 4 and close(a, b, 1e-5), (a, b)


@pytest.mark.parametrize("before, after", [(2, 1), (1, 2), (2, 4)])
def test_fsdp_resumes_on_a_different_world_size(cache_dir, tmp_path, before, after):
    """Stopped at step 3 with `before` ranks, continued with `after`: DCP reshards weights and AdamW state, the
    loader continues from its global position; the losses follow the uninterrupted run."""
    args = ["train.steps=6", "train.engine=fsdp", *GLOBAL]
    straight, split = tmp_path / "straight", tmp_path / "split"
    run_lctrain(cache_dir, straight, *args, nproc=before, timeout=600)
    run_lctrain(cache_dir, split, *args, "train.stop_at=3", nproc=before, timeout=600)
    proc = run_lctrain(cache_dir, split, *args, nproc=after, timeout=600)
    assert "resumed from" in proc.stdout
    a, b = train_losses(straight), train_losses(split)
    assert sorted(b) == list(range(1, 7))
    assert close(a, b, 1e-5), (a, b)
    assert json.loads((split / "checkpoints" / "step-6" / "trainer.json").read_text())["world_size"] == after


def test_fsdp_resume_is_bit_identical_with_async_saves(cache_dir, tmp_path):
    args = ["train.steps=6", "train.engine=fsdp", "checkpoint.async=true", "checkpoint.interval=2", *GLOBAL]
    straight, split = tmp_path / "straight", tmp_path / "split"
    run_lctrain(cache_dir, straight, *args, nproc=2, timeout=600)
    run_lctrain(cache_dir, split, *args, "train.stop_at=3", nproc=2, timeout=600)
    run_lctrain(cache_dir, split, *args, nproc=2, timeout=600)
    assert train_losses(straight) == train_losses(split)
    names = {p.name for p in (split / "checkpoints").iterdir()}
    assert {"step-4", "step-6"} <= names and (split / "checkpoints" / "latest").read_text().strip() == "step-6"
    assert _complete(split / "checkpoints" / "step-4") and _complete(split / "checkpoints" / "step-6")


def _complete(ckpt) -> bool:
    meta = ckpt / "dcp" / ".metadata"
    return meta.is_file() and (ckpt / "manifest.json").is_file() and len(list((ckpt / "dcp").glob("*.distcp"))) == 2


def _children(pid: int) -> list[int]:
    """The launcher's workers (torchrun starts each in its own session, so killing its group misses them)."""
    out = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry.name))
        except (OSError, IndexError, ValueError):
            continue
    return out


def _kill9_all(proc) -> None:
    """SIGKILL the launcher and every rank at once (no handler runs), and wait until they are gone."""
    victims = [proc.pid, *_children(proc.pid)]
    for pid in victims:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    deadline = time.time() + 60
    while time.time() < deadline and any(Path(f"/proc/{pid}").exists() and
                                         (Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z")
                                         for pid in victims if Path(f"/proc/{pid}").exists()):
        time.sleep(0.2)


def test_kill9_during_async_save_leaves_latest_complete(cache_dir, tmp_path):
    run = tmp_path / "run"
    # a model big enough that a background write takes a while
    big = ["model.d_model=256", "model.ffn_dim=1024", "model.n_layers=4", "model.pattern=GGGA"]
    for delay in (0.3, 1.0, 2.0):
        done = max(train_losses(run), default=0) if (run / "metrics.jsonl").is_file() else 0
        cmd = lctrain_cmd(run, "train.steps=100000", "train.engine=fsdp", "checkpoint.async=true",
                          "checkpoint.interval=1", *big, nproc=2)
        proc = subprocess.Popen(cmd, cwd=ROOT, env=child_env(cache_dir), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        try:
            deadline = time.time() + 300
            while time.time() < deadline and proc.poll() is None:  # kill while it trains and saves
                if (run / "metrics.jsonl").is_file() and max(train_losses(run), default=0) >= done + 2:
                    break
                time.sleep(0.2)
            time.sleep(delay)
        finally:
            _kill9_all(proc)
        latest = (run / "checkpoints" / "latest").read_text().strip()
        assert _complete(run / "checkpoints" / latest), latest
        model, _ = lctrain.load_model(run)  # and the sharded checkpoint reads back whole
        assert torch.isfinite(next(model.parameters())).all()
    step = int((run / "checkpoints" / "latest").read_text().strip().split("-")[1])
    run_lctrain(cache_dir, run, f"train.steps={step + 1}", "train.engine=fsdp", *big, nproc=2, timeout=600)
    assert not list((run / "checkpoints").glob(".tmp-*"))


def test_fsdp_run_exports_and_loads_like_the_ddp_run(cache_dir, tmp_path):
    """The same training under both engines: load_model (sharded checkpoint read directly), the HF export and
    `eval` give the ddp run's logits."""
    transformers = pytest.importorskip("transformers")
    args = ["train.steps=3", "model.pattern=GLA", "model.n_layers=3", *GLOBAL]
    run_lctrain(cache_dir, tmp_path / "ddp", *args, nproc=2, timeout=600)
    run_lctrain(cache_dir, tmp_path / "fsdp", *args, "train.engine=fsdp", nproc=2, timeout=600)
    assert (tmp_path / "fsdp" / "checkpoints" / "step-3" / "dcp" / ".metadata").is_file()
    # the loop's final evaluation (every rank runs every batch under fsdp, they are shared under ddp) agrees
    evals = [[r["eval_loss"] for r in read_metrics(tmp_path / e) if "eval_loss" in r] for e in ("ddp", "fsdp")]
    assert len(evals[0]) == 1 and math.isclose(evals[0][0], evals[1][0], rel_tol=1e-5), evals
    out = _export_fp32(cache_dir, tmp_path / "fsdp", tmp_path / "hf")
    ddp, tok = lctrain.load_model(tmp_path / "ddp")
    fsdp, _ = lctrain.load_model(tmp_path / "fsdp" / "checkpoints" / "step-3")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).eval()
    ids = torch.tensor([[tok.bos_id] + tok.encode("def main():\n    return 42\n")])
    with torch.no_grad():
        reference = ddp(ids)
        torch.testing.assert_close(fsdp(ids), reference, rtol=0, atol=1e-4)
        torch.testing.assert_close(hf(ids).logits, reference, rtol=0, atol=1e-4)
    proc = subprocess.run([sys.executable, "-m", "lctrain", "eval", str(tmp_path / "fsdp"), "--task", "ppl"],
                          cwd=ROOT, env=child_env(cache_dir), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_fsdp_lora_run_exports_like_the_ddp_lora_run(cache_dir, tmp_path):
    """LoRA from the same base under both engines on 2 ranks: the same losses, and the fsdp run's HF export (its
    sharded adapters merged into the base) gives the ddp run's logits."""
    transformers = pytest.importorskip("transformers")
    shape = ["model.pattern=A", "model.n_heads=4", *GLOBAL]
    base = tmp_path / "base"
    run_lctrain(cache_dir, base, *shape, "train.steps=2", timeout=600)
    lora = [*shape, "lora.enabled=true", "lora.r=4", "train.lr=1e-2", f"checkpoint.init_from={base}",
            "train.steps=3"]
    run_lctrain(cache_dir, tmp_path / "ddp", *lora, nproc=2, timeout=600)
    run_lctrain(cache_dir, tmp_path / "fsdp", *lora, "train.engine=fsdp", nproc=2, timeout=600)
    a, b = train_losses(tmp_path / "ddp"), train_losses(tmp_path / "fsdp")
    assert len(a) == 3 and close(a, b, 1e-5), (a, b)
    ckpt = tmp_path / "fsdp" / "checkpoints" / "step-3"
    assert (ckpt / "adapter.json").is_file() and (ckpt / "dcp" / ".metadata").is_file()
    out = _export_fp32(cache_dir, tmp_path / "fsdp", tmp_path / "hf")
    ddp, tok = lctrain.load_model(tmp_path / "ddp")
    base_model, _ = lctrain.load_model(base)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.tensor([[tok.bos_id] + tok.encode("def main():\n    return 42\n")])
    with torch.no_grad():
        reference = ddp(ids)
        assert (base_model(ids) - reference).abs().max() > 1e-3  # the adapters moved the model
        torch.testing.assert_close(hf(ids).logits, reference, rtol=0, atol=1e-4)


def test_fsdp_init_from_a_run_reads_its_weights_like_ddp(cache_dir, tmp_path):
    """checkpoint.init_from under fsdp: the model is built on meta and the base run's weights are read piece by
    piece as the shards are materialised; the losses are the ddp run's from the same base."""
    shape = ["model.pattern=GA", *GLOBAL]
    base = tmp_path / "base"
    run_lctrain(cache_dir, base, *shape, "train.steps=2", timeout=600)
    args = [*shape, f"checkpoint.init_from={base}", "train.steps=2"]
    run_lctrain(cache_dir, tmp_path / "ddp", *args, nproc=2, timeout=600)
    run_lctrain(cache_dir, tmp_path / "fsdp", *args, "train.engine=fsdp", nproc=2, timeout=600)
    a, b = train_losses(tmp_path / "ddp"), train_losses(tmp_path / "fsdp")
    assert len(a) == 2 and close(a, b, 1e-5), (a, b)
    assert a[1] < train_losses(base)[1] - 0.1  # it started from the trained base, not from a fresh init
