import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# A model and data small enough that a step takes milliseconds on a CPU core.
SMALL = [
    "model.d_model=64", "model.n_layers=2", "model.n_heads=2", "model.ffn_dim=128", "model.pattern=GA",
    "data.seq_len=64", "data.vocab_size=512", "data.tokenizer_sample_chars=150000", "data.max_documents=40",
    "train.micro_batch_size=4", "train.log_interval=1", "train.eval_interval=0", "train.eval_batches=2",
    "train.warmup_steps=2", "logging.progress=plain",
]


def child_env(cache_dir) -> dict:
    env = dict(os.environ)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TRITON_INTERPRET"):
        env.pop(key, None)
    env.update(LCTRAIN_CACHE=str(cache_dir), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               PYTHONUNBUFFERED="1")
    return env


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def lctrain_cmd(run_dir, *overrides, nproc: int = 1) -> list[str]:
    args = ["recipes/tiny.yaml", f"run.dir={run_dir}", *SMALL, *overrides]
    if nproc == 1:
        return [sys.executable, "-m", "lctrain", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc_per_node={nproc}",
            f"--master_port={free_port()}", "-m", "lctrain", *args]


def run_lctrain(cache_dir, run_dir, *overrides, nproc: int = 1, timeout: int = 240) -> subprocess.CompletedProcess:
    proc = subprocess.run(lctrain_cmd(run_dir, *overrides, nproc=nproc), cwd=ROOT, env=child_env(cache_dir),
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def read_metrics(run_dir) -> list[dict]:
    import json
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def train_losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}
