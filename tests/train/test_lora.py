"""LoRA fine-tuning (peft): adapters start as the identity, checkpoints hold only what trains, resume is exact,
and the merged model (load_model / export) equals the adapter model."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lctrain.config import ConfigError, LoraConfig, ModelConfig, load_config
from lctrain.models import LanguageModel
from lctrain.train.lora import apply_lora, load_adapter, merge_lora
from tests.train.conftest import ROOT, run_lctrain

BASE = ["model.pattern=A", "model.n_heads=4"]
LORA = ["lora.enabled=true", "lora.r=4", "train.lr=1e-2", "model.mixers.attn.mode=sf_attn",
        "model.mixers.attn.rope_scaling=2", "data.seq_len=128", "checkpoint.interval=2"]


def _model(pattern="AGA") -> LanguageModel:
    torch.manual_seed(0)
    return LanguageModel(ModelConfig(vocab_size=97, d_model=32, n_layers=len(pattern), n_heads=4, ffn_dim=64,
                                     pattern=pattern))


def test_fresh_adapters_leave_the_model_unchanged():
    model = _model()
    ids = torch.randint(0, 97, (2, 19))
    before = model(ids, return_logits=True).logits
    apply_lora(model, LoraConfig(r=4, dropout=0.0))
    after = model(ids, return_logits=True).logits
    assert torch.equal(before, after)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in trained) and "embed.weight" in trained and "norm.weight" in trained
    assert not any(n.endswith("base_layer.weight") or ".mlp." in n for n in trained)


def test_merge_equals_the_adapter_model():
    model = _model()
    apply_lora(model, LoraConfig(r=4))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.normal_(0, 0.2)  # a trained-looking adapter, B != 0
    ids = torch.randint(0, 97, (1, 23))
    expected = model(ids, return_logits=True).logits
    merged = merge_lora(model)
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    assert isinstance(merged.layers[0].mixer.q_proj, torch.nn.Linear)
    torch.testing.assert_close(merged(ids, return_logits=True).logits, expected, rtol=1e-5, atol=1e-5)


def test_target_modules_that_match_nothing_are_refused():
    with pytest.raises(ConfigError, match="lora.target_modules.*qkv"):
        apply_lora(_model(), LoraConfig(target_modules=["qkv"]))


def test_lora_needs_a_base_model():
    with pytest.raises(ConfigError, match="checkpoint.init_from"):
        load_config(ROOT / "recipes/tiny.yaml", ["lora.enabled=true"])
    with pytest.raises(ConfigError, match="lora.r"):
        load_config(ROOT / "recipes/tiny.yaml", ["lora.enabled=true", "checkpoint.init_from=x", "lora.r=0"])


def test_lora_engines():
    """LoRA runs under ddp and fsdp; DeepSpeed is refused in one line naming the engines that work."""
    lora = ["lora.enabled=true", "checkpoint.init_from=x"]
    assert load_config(ROOT / "recipes/tiny.yaml", [*lora, "train.engine=fsdp"]).train.engine == "fsdp"
    with pytest.raises(ConfigError, match="lora.enabled: supported with train.engine 'ddp' or 'fsdp'"):
        load_config(ROOT / "recipes/tiny.yaml", [*lora, "train.engine=deepspeed"])


def test_adapters_do_not_depend_on_the_global_generator():
    """Adapters are drawn from generators seeded by the model's init seed and module path: whatever torch's
    global generator did before (an eager vs a meta build, another engine), the same adapters."""
    first, second = _model(), _model()
    apply_lora(first, LoraConfig(r=4))
    torch.manual_seed(123)
    torch.rand(1000)
    apply_lora(second, LoraConfig(r=4))
    a, b = dict(first.named_parameters()), dict(second.named_parameters())
    names = [n for n in a if "lora_A" in n]
    assert names and all(torch.equal(a[n], b[n]) for n in names)
    assert not torch.equal(a[names[0]], a[names[1]])  # each module draws its own
    assert all(float(a[n].abs().sum()) == 0 for n in a if "lora_B" in n)


@pytest.fixture(scope="module")
def base_run(cache_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("lora") / "base"
    run_lctrain(cache_dir, run, *BASE, "train.steps=3")
    return run


def _adapter(run: Path, step: int) -> dict:
    return load_file(str(run / "checkpoints" / f"step-{step}" / "adapter.safetensors"))


def test_lora_run_checkpoints_adapters_resumes_exactly_and_exports_merged(cache_dir, base_run, tmp_path):
    whole, sliced = tmp_path / "whole", tmp_path / "sliced"
    run_lctrain(cache_dir, whole, *BASE, *LORA, f"checkpoint.init_from={base_run}", "train.steps=4")
    run_lctrain(cache_dir, sliced, *BASE, *LORA, f"checkpoint.init_from={base_run}", "train.steps=4",
                "train.stop_at=2")
    run_lctrain(cache_dir, sliced, *BASE, *LORA, f"checkpoint.init_from={base_run}", "train.steps=4")

    ckpt = whole / "checkpoints" / "step-4"
    assert (ckpt / "adapter.safetensors").is_file() and not (ckpt / "model.safetensors").exists()
    meta = json.loads((ckpt / "adapter.json").read_text())
    assert meta["r"] == 4 and Path(meta["base"]).is_file()
    tensors = _adapter(whole, 4)
    assert any("lora_B" in k for k in tensors) and "embed.weight" in tensors
    assert not any("base_layer" in k or ".mlp." in k for k in tensors)  # frozen weights are not stored
    assert any(bool(v.abs().sum() > 0) for k, v in tensors.items() if "lora_B" in k)  # the adapters trained
    resumed = _adapter(sliced, 4)
    assert tensors.keys() == resumed.keys()
    assert all(torch.equal(tensors[k], resumed[k]) for k in tensors)  # N steps == N/2 + N/2

    # The adapter model rebuilt by hand == the merged model load_model returns == the exported Llama.
    from lctrain import load_model
    from lctrain.export.hf_export import export_run
    from lctrain.export.run_files import locate
    from lctrain.train.checkpoint import load_weights

    cfg = load_config(ckpt / "config.yaml")
    adapter_model = LanguageModel(cfg.model)
    load_weights(adapter_model, base_run)
    apply_lora(adapter_model, cfg.lora)
    load_adapter(adapter_model, ckpt / "adapter.safetensors")
    adapter_model.eval()
    ids = torch.randint(4, 400, (1, 200))  # longer than training: full attention at evaluation
    with torch.no_grad():
        expected = adapter_model(ids, return_logits=True).logits
        merged, _ = load_model(whole)
        torch.testing.assert_close(merged(ids), expected, rtol=1e-4, atol=1e-4)
    assert locate(whole).weights.name == "adapter.safetensors"

    out = export_run(whole, tmp_path / "hf")
    hf_cfg = json.loads((out / "config.json").read_text())
    assert hf_cfg["model_type"] == "llama" and hf_cfg["rope_parameters"]["rope_type"] == "linear"
    assert hf_cfg["rope_parameters"]["factor"] == 2.0
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, expected, rtol=1e-4, atol=1e-4)
    reloaded, _ = load_model(out)  # the export round-trips through lctrain, rope scaling included
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids), expected, rtol=1e-4, atol=1e-4)
