"""The cluster recipes (hybrid_3to1_1b, hybrid_3to1_7b): size, layout, launch lines and the fsdp memory plan."""
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lctrain.config import load_config
from lctrain.models import LanguageModel
from lctrain.train.memory import fsdp_memory_lines, fsdp_memory_per_gpu

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def build(name):
    cfg = load_config(RECIPES / f"{name}.yaml", ["model.vocab_size=32000"])
    with torch.device("meta"):
        return cfg, LanguageModel(cfg.model)


@pytest.mark.parametrize("name, size", [("hybrid_3to1_1b", 1.3e9), ("hybrid_3to1_7b", 7.0e9)])
def test_cluster_recipe_size_layout_and_launch_lines(name, size):
    cfg, model = build(name)
    assert abs(model.num_parameters() - size) / size < 0.05, model.num_parameters()
    assert cfg.train.engine == "fsdp" and cfg.checkpoint.async_save
    assert model.layer_types[3::4] == ["attn"] * (cfg.model.n_layers // 4)
    assert cfg.model.n_kv_heads < cfg.model.n_heads  # GQA
    header = (RECIPES / f"{name}.yaml").read_text()
    assert "torchrun --nproc_per_node 8" in header and re.search(r"--nodes 8 --ntasks-per-node 8", header)


def test_7b_plan_fits_80gib_gpus_and_sharding_shrinks_the_state():
    cfg, model = build("hybrid_3to1_7b")
    assert cfg.data.seq_len == 131072 and cfg.parallel.sp == 8
    at8, at64 = fsdp_memory_per_gpu(cfg, model, 8), fsdp_memory_per_gpu(cfg, model, 64)
    n = model.num_parameters()
    assert at8["adamw"] == pytest.approx(8 * n / 8) and at64["adamw"] == pytest.approx(8 * n / 64)
    assert at8["total"] < 80 * 2**30 and at64["total"] < at8["total"]
    lines = fsdp_memory_lines(cfg, model, [8, 64])  # the planner's model of this layout (Ulysses attention)
    assert lines[0].startswith("fsdp memory per GPU at 8 GPUs (dp 1 x sp 8") and "64 GPUs (dp 8 x sp 8" in lines[1]
    totals = [float(re.search(r"\): ([\d.]+) GiB", line).group(1)) for line in lines]
    assert totals[1] < totals[0] < 80, totals


def test_full_gradients_counted_when_micro_batches_accumulate_unsharded():
    cfg, model = build("hybrid_3to1_7b")
    sharded = fsdp_memory_per_gpu(cfg, model, 8)["gradients"]
    cfg.parallel.fsdp_grad_sync = "step"  # 8 micro-batches per step at 8 GPUs keep full gradients between them
    assert fsdp_memory_per_gpu(cfg, model, 8)["gradients"] == pytest.approx(sharded + 2 * model.num_parameters())


@pytest.mark.slow
def test_7b_dry_run_prints_the_fsdp_memory_plan(cache_dir):
    from tests.train.conftest import ROOT, child_env
    proc = subprocess.run([sys.executable, "-m", "lctrain", "recipes/hybrid_3to1_7b.yaml",
                           "data.sources=[{type: mqar, num_examples: 2, num_kv_pairs: 4}]", "data.vocab_size=512",
                           "data.tokenizer_sample_chars=150000", "--dry-run"], cwd=ROOT, env=child_env(cache_dir),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "fsdp memory per GPU at 8 GPUs (dp 1 x sp 8" in proc.stdout
    assert "fsdp memory per GPU at 64 GPUs (dp 8 x sp 8" in proc.stdout
