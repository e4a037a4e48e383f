"""Import: a local Llama checkpoint becomes an lctrain model (load_model) or a run's starting point (init_from)."""
import json
import subprocess

import pytest
import torch
from safetensors.torch import load_file

import lctrain
from lctrain.config import ConfigError, ModelConfig
from lctrain.export.hf_import import follow_hf_config
from tests.train.conftest import ROOT, child_env, lctrain_cmd, run_lctrain

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402


def save_tiny_llama(path, vocab: int, tie: bool = False, **overrides):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
                         rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
                         tie_word_embeddings=tie, **overrides)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(path)
    return model


@pytest.mark.parametrize("tie", [False, True])
def test_llama_round_trip_gives_equal_logits(tmp_path, tie):
    hf = save_tiny_llama(tmp_path / "llama", vocab=300, tie=tie)
    model, tokenizer = lctrain.load_model(tmp_path / "llama")
    assert tokenizer is None  # this checkpoint ships no tokenizer.model
    cfg = model.config
    assert (cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.ffn_dim) == (64, 2, 4, 2, 160)
    assert cfg.rope_theta == 500000.0 and cfg.norm_eps == 1e-5 and cfg.tie_embeddings == tie
    ids = torch.randint(0, 300, (2, 17))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, rtol=0, atol=1e-4)


def test_recipe_follows_the_checkpoint_or_says_what_contradicts(tmp_path):
    save_tiny_llama(tmp_path / "llama", vocab=300)
    cfg = ModelConfig()
    follow_hf_config(cfg, tmp_path / "llama")
    assert (cfg.d_model, cfg.n_kv_heads, cfg.ffn_dim, cfg.vocab_size, cfg.tie_embeddings) == (64, 2, 160, 300, False)
    with pytest.raises(ConfigError, match=r"model.d_model: the recipe says 96 .* has 64"):
        follow_hf_config(ModelConfig(d_model=96), tmp_path / "llama")


def test_unsupported_architecture_is_one_clear_error(tmp_path):
    save_tiny_llama(tmp_path / "biased", vocab=300, attention_bias=True)
    with pytest.raises(ConfigError, match="unsupported architecture: linear-layer biases"):
        follow_hf_config(ModelConfig(), tmp_path / "biased")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ConfigError, match="model_type 'gpt2' is not supported"):
        follow_hf_config(ModelConfig(), tmp_path / "other")


def test_init_from_hf_starts_training_from_the_checkpoint(cache_dir, tmp_path, tokenizer):
    """The checkpoint's tokenizer.model is used and its weights are the run's step-0 weights."""
    hf_dir = tmp_path / "llama"
    hf = save_tiny_llama(hf_dir, vocab=tokenizer.vocab_size)
    tokenizer.save(hf_dir)
    run = tmp_path / "run"
    # The recipe may repeat the checkpoint's values (SMALL sets others); keys left at their defaults follow it.
    same = ["model.pattern=A", "model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.ffn_dim=160"]
    run_lctrain(cache_dir, run, f"checkpoint.init_from=hf:{hf_dir}", "train.steps=0", *same)
    saved = load_file(str(run / "checkpoints" / "step-0" / "model.safetensors"))
    assert saved["layers.1.mixer.k_proj.weight"].shape == (32, 64)
    assert torch.equal(saved["layers.1.mlp.down.weight"], hf.model.layers[1].mlp.down_proj.weight)
    assert (run / "tokenizer" / "tokenizer.model").read_bytes() == tokenizer.model_proto

    proc = subprocess.run(lctrain_cmd(tmp_path / "bad", f"checkpoint.init_from=hf:{hf_dir}", "model.d_model=96"),
                          cwd=ROOT, env=child_env(cache_dir), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: model.d_model: the recipe says 96 but the checkpoint {hf_dir} has 64; remove model.d_model "
        "from the recipe (it follows the checkpoint)"]


def test_sinklora_fine_tune_of_a_hugging_face_llama_exports_merged(cache_dir, tmp_path, tokenizer):
    """hf: base -> LoRA + SF-Attn + RoPE interpolation run -> adapters name the hf: base -> merged Llama export."""
    hf_dir = tmp_path / "llama"
    save_tiny_llama(hf_dir, vocab=tokenizer.vocab_size)
    tokenizer.save(hf_dir)
    run = tmp_path / "run"
    same = ["model.pattern=A", "model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.ffn_dim=160"]
    run_lctrain(cache_dir, run, f"checkpoint.init_from=hf:{hf_dir}", "train.steps=2", "train.lr=1e-2", *same,
                "lora.enabled=true", "model.mixers.attn.mode=sf_attn", "model.mixers.attn.rope_scaling=2",
                "data.seq_len=128")
    meta = json.loads((run / "checkpoints" / "step-2" / "adapter.json").read_text())
    assert meta["base"].startswith("hf:") and meta["base"].endswith("llama")
    from lctrain import load_model
    from lctrain.export.hf_export import export_run
    merged, _ = load_model(run)
    out = export_run(run, tmp_path / "export")
    exported = LlamaForCausalLM.from_pretrained(out).eval()
    assert exported.config.rope_parameters["rope_type"] == "linear"
    ids = torch.randint(4, tokenizer.vocab_size, (1, 90))
    with torch.no_grad():
        torch.testing.assert_close(exported(ids).logits, merged(ids), rtol=1e-4, atol=1e-4)
