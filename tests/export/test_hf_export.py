"""Export to the Hugging Face format: transformers loads every mixer type offline, logits match lctrain's, and
generate() continues greedily exactly as lctrain's own model would."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from lctrain.export.hf_export import export_model
from tests.export.conftest import lctrain_logits, tiny_model

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM  # noqa: E402


def greedy(model, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """lctrain's greedy continuation, recomputing the whole prefix each step (no cache: the reference)."""
    for _ in range(new_tokens):
        next_id = lctrain_logits(model, ids)[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, next_id], dim=1)
    return ids


@pytest.mark.parametrize("pattern", ["G", "L", "GLA"])
def test_hybrid_export_loads_with_remote_code(tokenizer, tmp_path, pattern):
    model = tiny_model(tokenizer.vocab_size, pattern, n_kv_heads=2, tie_embeddings=pattern != "GLA")
    out = export_model(model, tokenizer, tmp_path / "export", max_positions=128)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "lctrain"
    assert config["mixer_types"] == list(model.layer_types)
    assert len(config["layer_types"]) == len(pattern)
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_lctrain.LctrainForCausalLM"
    for name in ("model.safetensors", "tokenizer.model", "tokenizer_config.json", "generation_config.json",
                 "configuration_lctrain.py", "modeling_lctrain.py"):
        assert (out / name).is_file(), name

    hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).eval()
    ids = torch.randint(0, tokenizer.vocab_size, (2, 24))
    with torch.no_grad():
        theirs = hf(ids).logits
    torch.testing.assert_close(theirs, lctrain_logits(model, ids), rtol=0, atol=1e-4)

    hf_tok = AutoTokenizer.from_pretrained(out, trust_remote_code=True)
    text = "def f(x):\n    return x  # ok"
    prompt = torch.tensor([hf_tok(text).input_ids])
    assert prompt[0].tolist() == [tokenizer.bos_id] + tokenizer.encode(text)
    generated = hf.generate(prompt, max_new_tokens=6, do_sample=False)
    assert torch.equal(generated, greedy(model, prompt, 6))  # cached decoding == full recomputation


def test_pure_attention_exports_as_plain_llama(tokenizer, tmp_path):
    model = tiny_model(tokenizer.vocab_size, "A", n_kv_heads=2, tie_embeddings=False, rope_theta=50000.0,
                       norm_eps=1e-5)
    out = export_model(model, tokenizer, tmp_path / "llama", max_positions=128)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and "auto_map" not in config
    assert not (out / "modeling_lctrain.py").exists()
    assert config["num_key_value_heads"] == 2 and config["intermediate_size"] == 96
    hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=False, dtype=torch.float32).eval()
    assert isinstance(hf, LlamaForCausalLM)
    assert hf.config.rms_norm_eps == 1e-5 and not hf.config.tie_word_embeddings
    ids = torch.randint(0, tokenizer.vocab_size, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, lctrain_logits(model, ids), rtol=0, atol=1e-4)
    prompt = ids[:1, :8]
    assert torch.equal(hf.generate(prompt, max_new_tokens=5, do_sample=False), greedy(model, prompt, 5))


def test_tokenizer_matches_sentencepiece(tokenizer, tmp_path):
    out = export_model(tiny_model(tokenizer.vocab_size, "A"), tokenizer, tmp_path / "tok")
    hf_tok = AutoTokenizer.from_pretrained(out)
    texts = ["  two  spaces\n\ttab\n", "unicode: héllo ✓ 日本語", "class A:\n    def f(self):\n        pass\n"]
    for text in texts:
        ids = hf_tok(text, add_special_tokens=False).input_ids
        assert ids == tokenizer.encode(text), text
        assert hf_tok.decode(ids) == tokenizer.decode(ids) == text


def test_large_models_are_sharded_with_an_index(tokenizer, tmp_path):
    model = tiny_model(tokenizer.vocab_size, "GA")
    out = export_model(model, tokenizer, tmp_path / "sharded", max_shard_size="60KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).eval()
    ids = torch.randint(0, tokenizer.vocab_size, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, lctrain_logits(model, ids), rtol=0, atol=1e-4)


def test_exported_code_runs_without_lctrain(tokenizer, tmp_path):
    """The modeling files use only torch + transformers: run them in an isolated interpreter where importing
    lctrain fails, with the pure-PyTorch recurrences, and compare to lctrain's logits."""
    model = tiny_model(tokenizer.vocab_size, "GLA")
    out = export_model(model, tokenizer, tmp_path / "standalone")
    ids = torch.randint(0, tokenizer.vocab_size, (2, 20))
    torch.save(ids, tmp_path / "ids.pt")
    script = tmp_path / "check.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        sys.modules["lctrain"] = None  # even if an installed copy is on the path, importing it fails
        try:
            import lctrain  # noqa: F401
            raise SystemExit("lctrain is importable")
        except ImportError:
            pass
        import torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True, dtype=torch.float32)
        ids = torch.load({str(tmp_path / "ids.pt")!r})
        with torch.no_grad():
            torch.save(model.eval()(ids).logits, {str(tmp_path / "logits.pt")!r})
        model.generate(ids[:1, :5], max_new_tokens=3, do_sample=False)
    """))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "LCTRAIN_HF_KERNELS")}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    proc = subprocess.run([sys.executable, "-I", str(script)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    theirs = torch.load(tmp_path / "logits.pt")
    torch.testing.assert_close(theirs, lctrain_logits(model, ids), rtol=0, atol=1e-4)
