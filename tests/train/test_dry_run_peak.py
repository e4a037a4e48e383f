"""The peak memory `--dry-run` prints vs the peak MemTracker measures over a real fp32 training step on CPU.

Every mixer type (the ones `lctrain plan` models and the ones it does not), with and without activation
checkpointing, packed documents, a large vocabulary with the auto loss chunk. The measurement counts the tensors
allocated inside every kernel op (as a device allocator would), and the estimate is read off the line the dry run
prints, so a drift of either fails here."""
import functools
import re

import pytest
import torch

from lctrain.config import load_config
from lctrain.models import LanguageModel
from lctrain.train.memory import (activation_memory_estimate, breakdown_any_mixers, peak_memory_estimate,
                                  peak_memory_line, run_workload)
from tests.plan.kernel_ops import ALL_OPS
from tests.plan.measure import measured_peak_bytes
from tests.train.conftest import ROOT

BASE = ["model.vocab_size=512", "model.loss_chunk_tokens=256"]
SMALL = ["model.d_model=96", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_dim=256"]
# name: (overrides, rows, seq_len, document length)
CASES = {
    "swa_sink": (BASE + SMALL + ["model.n_layers=4", "model.pattern=SSSA",
                                 "model.mixers={swa: {window: 64, sink: 4}}"], 2, 512, 200),
    "based": (BASE + SMALL + ["model.n_layers=3", "model.pattern=BBA"], 1, 512, 512),
    "landmark": (BASE + SMALL + ["model.n_layers=2", "model.pattern=M",
                                 "model.mixers={landmark: {block_size: 64}}"], 2, 512, 256),
    "titans_mac": (BASE + SMALL + ["model.n_layers=2", "model.pattern=TA"], 1, 512, 256),
    "mixed_checkpointed": (BASE + SMALL + ["model.n_layers=4", "model.pattern=SBMA",
                                           "model.activation_checkpointing=true"], 2, 512, 512),
    "gdn_linear_checkpointed": (BASE + SMALL + ["model.n_layers=4", "model.pattern=GGLA",
                                                "model.activation_checkpointing=true"], 1, 512, 100),
    "big_vocab_auto_chunk": (["model.vocab_size=16384", "model.loss_chunk_tokens=0"] + SMALL
                             + ["model.n_layers=2", "model.pattern=SA"], 1, 512, 512),
}
SLOW_CASES = {
    # the taylor op's backward holds one document's chunk tensors at a time: the estimate assumes one document per
    # row (the largest case), so packed documents come in below it
    "based_packed": (BASE + SMALL + ["model.n_layers=3", "model.pattern=BBA"], 2, 512, 256),
    "titans_mal_checkpointed": (BASE + SMALL + ["model.n_layers=4", "model.pattern=TTTA",
                                                "model.mixers={titans: {variant: mal}}",
                                                "model.activation_checkpointing=true"], 2, 512, 200),
    "hybrid_3to1": (BASE + ["model.d_model=128", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_dim=320",
                            "model.n_layers=4", "model.pattern=GGGA"], 2, 512, 256),
}
PEAK = re.compile(r"peak memory \(estimate, per process, (fp32|bf16 autocast), torch kernels\): ([0-9.]+) MiB")


def recipe(overrides, rows, seq_len):
    return load_config(None, overrides + [f"data.seq_len={seq_len}", f"train.micro_batch_size={rows}"])


def printed_peak_mib(cfg) -> float:
    """The number the dry run prints for this recipe on one CPU process."""
    line = peak_memory_line(cfg, LanguageModel(cfg.model), 1, "cpu")
    match = PEAK.search(line)
    assert match and match.group(1) == ("bf16 autocast" if cfg.train.dtype == "bfloat16" else "fp32"), line
    return float(match.group(2))


@functools.lru_cache(maxsize=None)
def measured_mib(name: str, bf16: bool = False) -> float:
    overrides, rows, seq_len, doc_len = {**CASES, **SLOW_CASES}[name]
    return measured_peak_bytes(overrides, rows, seq_len, doc_len, ALL_OPS, bf16) / 2**20


def check(name: str, bf16: bool = False) -> None:
    overrides, rows, seq_len, _ = {**CASES, **SLOW_CASES}[name]
    dtype = [f"train.dtype={'bfloat16' if bf16 else 'float32'}"]
    estimate, measured = printed_peak_mib(recipe(overrides + dtype, rows, seq_len)), measured_mib(name, bf16)
    assert 0.75 <= estimate / measured <= 1.25, (name, bf16, estimate, measured)


@pytest.mark.parametrize("name", sorted(CASES))
def test_printed_peak_within_25_percent_of_measured(name):
    check(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SLOW_CASES))
def test_printed_peak_within_25_percent_of_measured_slow(name):
    check(name)


def test_printed_bf16_peak_within_25_percent_of_measured():
    """`train.dtype: bfloat16` on CPU runs the step under bf16 autocast (as `auto` does on CUDA): the estimate
    counts bf16 activations beside the fp32 residual stream and master weights."""
    check("landmark", bf16=True)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["swa_sink", "titans_mac", "hybrid_3to1", "mixed_checkpointed"])
def test_printed_bf16_peak_within_25_percent_of_measured_slow(name):
    check(name, bf16=True)


MIXERS = {
    "swa": ["model.pattern=S", "model.n_heads=6", "model.n_kv_heads=2", "model.mixers={swa: {window: 64, sink: 4}}"],
    "landmark": ["model.pattern=M", "model.n_heads=6", "model.n_kv_heads=3"],
    "based": ["model.pattern=B", "model.n_heads=6", "model.mixers={based: {feature_dim: 8}}"],
    "titans_mac": ["model.pattern=T", "model.n_heads=6"],
    "titans_mag": ["model.pattern=T", "model.n_heads=6", "model.mixers={titans: {variant: mag}}"],
    "titans_mal": ["model.pattern=T", "model.n_heads=6", "model.mixers={titans: {variant: mal}}"],
}


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16_autocast"])
@pytest.mark.parametrize("kind", sorted(MIXERS))
def test_saved_tensors_of_other_mixers_match_their_counts(kind, bf16):
    """`lctrain.train.mixer_memory`'s counts vs the tensors autograd saves (shapes other than the fitted ones)."""
    from lctrain.plan.activations import block_elements
    from lctrain.train.mixer_memory import mixer_elements
    from tests.plan.test_activations import ROWS, SEQ_LEN, measured_one_layer
    model, measured = measured_one_layer(MIXERS[kind], bf16)
    elem = 2 if bf16 else 4
    counted = ROWS * SEQ_LEN * elem * (block_elements(96, 224, elem) + mixer_elements(model.layers[0].mixer, 96, elem))
    assert abs(counted / measured - 1) < 0.1, (kind, counted, measured)


def test_cli_dry_run_prints_the_estimate(tmp_path, monkeypatch, capsys):
    """`python -m lctrain RECIPE --dry-run` (in process) prints the same number, and it matches the measurement."""
    from lctrain.cli import main
    monkeypatch.setenv("LCTRAIN_CACHE", str(tmp_path / "cache"))
    overrides, rows, seq_len, _ = CASES["titans_mac"]
    args = [str(ROOT / "recipes" / "tiny.yaml"), f"run.dir={tmp_path / 'run'}",
            "data.sources=[{type: mqar, num_examples: 4}]",
            f"data.seq_len={seq_len}", f"train.micro_batch_size={rows}", "train.tokens_per_step=0", *overrides,
            "--dry-run"]
    assert main(args) == 0
    match = PEAK.search(capsys.readouterr().out)
    assert match
    assert float(match.group(2)) == printed_peak_mib(recipe(overrides, rows, seq_len))
    assert 0.75 <= float(match.group(2)) / measured_mib("titans_mac") <= 1.25


def test_generic_breakdown_is_the_planner_for_its_mixer_types():
    """The assembly used for swa/based/landmark/titans gives the planner's figures on a model the planner models."""
    from lctrain.plan.memory import memory_breakdown
    from lctrain.plan.search import current_candidate
    from lctrain.plan.shape import shape_of
    for ckpt in ("false", "true"):
        overrides, rows, seq_len, _ = CASES["gdn_linear_checkpointed"]
        cfg = recipe(overrides + [f"model.activation_checkpointing={ckpt}", "model.pattern=GLCA"], rows, seq_len)
        model = LanguageModel(cfg.model)
        cand, work = current_candidate(cfg, 1), run_workload(cfg, "cpu")
        planned = memory_breakdown(shape_of(model), cand, work, cfg.deepspeed.reduce_bucket_size)
        generic = breakdown_any_mixers(cfg, model, cand, work)
        assert generic["peak_tensor_bytes"] == planned["peak_tensor_bytes"]
        assert {k: v for k, v in generic.items() if k != "total_gib"} == \
            {k: v for k, v in planned.items() if k != "total_gib"}


@pytest.mark.parametrize("pattern", ["A", "S", "GA", "SBMT"])
def test_no_quadratic_term_and_bf16_where_autocast_runs(pattern):
    """Attention runs on the fused op on every backend: the estimate depends on the tokens of a micro-batch, not on
    how they split into rows (no [H, T, T] term). Under `auto` on CUDA and `bfloat16` anywhere activations are
    bf16, so they take about half of fp32's bytes."""
    base = ["model.vocab_size=512", "model.d_model=64", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_dim=192",
            f"model.n_layers={len(pattern)}", f"model.pattern={pattern}", "model.loss_chunk_tokens=256"]
    for device in ("cpu", "cuda"):
        short = recipe(base, 8, 256)
        long = recipe(base, 1, 2048)
        model = LanguageModel(short.model)
        assert activation_memory_estimate(short, model, device) == activation_memory_estimate(long, model, device)
    cfg = recipe(base, 2, 1024)
    model = LanguageModel(cfg.model)
    assert run_workload(cfg, "cuda").dtype_bytes == 2 and run_workload(cfg, "cpu").dtype_bytes == 4
    bf16 = recipe(base + ["train.dtype=bfloat16"], 2, 1024)
    assert run_workload(bf16, "cpu").dtype_bytes == 2 and run_workload(bf16, "cpu").mixed_precision
    fp32, half = activation_memory_estimate(cfg, model, "cpu"), activation_memory_estimate(cfg, model, "cuda")
    # less, but not half: the residual stream, the norms around it and the loss chunk stay fp32 under autocast
    assert 0.5 < half / fp32 < 0.9
    assert peak_memory_estimate(bf16, model, 1, "cpu")["peak"] < peak_memory_estimate(cfg, model, 1, "cpu")["peak"]
