"""A Hugging Face Llama converts into a GGGA hybrid, aligns, distils, exports, and loads back in transformers."""
import json

import pytest
import torch

import lctrain
from tests.train.conftest import read_metrics, run_lctrain

transformers = pytest.importorskip("transformers")


def save_llama(path, vocab: int):
    """A random 4-layer Llama with grouped-query attention (2 kv heads for 4 query heads)."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=160, num_hidden_layers=4,
                                      num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
                                      tie_word_embeddings=False)
    transformers.LlamaForCausalLM(config).save_pretrained(path)

SAME = ["model.pattern=A", "model.d_model=64", "model.n_layers=4", "model.n_heads=4", "model.ffn_dim=160"]


def test_llama_converts_distils_and_exports(cache_dir, tmp_path, tokenizer):
    hf_dir = tmp_path / "llama"
    save_llama(hf_dir, tokenizer.vocab_size)
    tokenizer.save(hf_dir)
    run = tmp_path / "run"
    proc = run_lctrain(cache_dir, run, f"checkpoint.init_from=hf:{hf_dir}", *SAME, "convert.enabled=true",
                       "convert.pattern=GGGA", "distill.enabled=true", "distill.align_steps=3", "distill.alpha=0.7",
                       "distill.chunk_tokens=100", "model.loss_chunk_tokens=0", "train.steps=3")
    assert "converted layers [0, 1, 2]" in proc.stdout
    records = read_metrics(run)
    align = [r for r in records if r.get("stage") == "align"]
    assert [r["step"] for r in align] == [-2, -1, 0] and all(r["align_mse"] > 0 for r in align)
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    for r in steps:  # the logged loss is the distillation objective of its parts
        assert r["distill_kl"] >= 0 and r["distill_ce"] > 0
        assert r["loss"] == pytest.approx(0.7 * r["distill_kl"] + 0.3 * r["distill_ce"], rel=1e-5)
    saved = json.loads((run / "checkpoints" / "step-3" / "trainer.json").read_text())
    assert saved["step"] == 3

    model, _ = lctrain.load_model(run)
    assert model.config.pattern == "GGGA"
    from lctrain.export.hf_export import export_run
    out = export_run(run, tmp_path / "export")
    exported = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    ids = torch.randint(4, tokenizer.vocab_size, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(exported(ids).logits, model(ids), rtol=1e-4, atol=1e-4)


def test_conversion_without_a_source_is_one_line(cache_dir, tmp_path):
    import subprocess
    from tests.train.conftest import ROOT, child_env, lctrain_cmd
    proc = subprocess.run(lctrain_cmd(tmp_path / "r", "convert.enabled=true"), cwd=ROOT, env=child_env(cache_dir),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: convert.enabled: conversion starts from an attention model; set checkpoint.init_from to a run, a "
        "checkpoint or hf:PATH"]


@pytest.mark.slow
def test_conversion_under_ddp_equals_one_process(cache_dir, tmp_path, tokenizer):
    """2 DDP ranks with 4 sequences each == 1 process with 8: calibration statistics are reduced over ranks and
    the distillation loss is normalised by the step's targets, so the losses agree."""
    from tests.train.conftest import train_losses
    hf_dir = tmp_path / "llama"
    save_llama(hf_dir, tokenizer.vocab_size)
    tokenizer.save(hf_dir)
    common = [f"checkpoint.init_from=hf:{hf_dir}", *SAME, "convert.enabled=true", "distill.enabled=true",
              "distill.align_steps=2", "train.steps=3", "train.tokens_per_step=512"]
    run_lctrain(cache_dir, tmp_path / "one", *common, "train.micro_batch_size=8")
    run_lctrain(cache_dir, tmp_path / "two", *common, "train.micro_batch_size=4", nproc=2)
    one, two = train_losses(tmp_path / "one"), train_losses(tmp_path / "two")
    assert one.keys() == two.keys() == {1, 2, 3}
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-4)


@pytest.mark.slow
def test_conversion_under_fsdp_equals_ddp(cache_dir, tmp_path, tokenizer):
    """The same conversion (calibration, alignment, distillation) under fsdp, student and teacher sharded over 2
    ranks, gives the ddp run's losses."""
    from tests.train.conftest import train_losses
    hf_dir = tmp_path / "llama"
    save_llama(hf_dir, tokenizer.vocab_size)
    tokenizer.save(hf_dir)
    common = [f"checkpoint.init_from=hf:{hf_dir}", *SAME, "convert.enabled=true", "distill.enabled=true",
              "distill.align_steps=2", "train.steps=3", "train.micro_batch_size=4"]
    run_lctrain(cache_dir, tmp_path / "ddp", *common, nproc=2)
    run_lctrain(cache_dir, tmp_path / "fsdp", *common, "train.engine=fsdp", nproc=2)
    ddp, fsdp = train_losses(tmp_path / "ddp"), train_losses(tmp_path / "fsdp")
    assert ddp.keys() == fsdp.keys() == {1, 2, 3}
    for step in ddp:
        assert fsdp[step] == pytest.approx(ddp[step], rel=1e-4)
    align = [r for r in read_metrics(tmp_path / "fsdp") if r.get("stage") == "align"]
    assert [r["step"] for r in align] == [-1, 0]
