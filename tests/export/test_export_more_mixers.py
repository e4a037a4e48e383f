"""Export of the swa, conv, based, titans (MAC/MAG/MAL) and landmark mixers: transformers loads them offline with
trust_remote_code, logits match lctrain's, generate() continues exactly as lctrain decodes, the export imports
back into lctrain, and the exported pure-PyTorch ops match lctrain's kernels."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import lctrain
from lctrain.data.landmarks import insert_landmarks
from lctrain.eval.generate import generate as lctrain_generate
from lctrain.export.hf_export import export_model
from lctrain.export.remote import lctrain_ops as ops
from lctrain.kernels import landmark_attention, local_attention, taylor_linear_attention, titans_linear_memory
from lctrain.kernels.titans_memory.mlp import mlp_titans_memory
from tests.export.conftest import lctrain_logits, tiny_model
from tests.export.test_hf_export import greedy

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM  # noqa: E402

# Small windows, segments, chunks and blocks so a 24-token input crosses every boundary.
TITANS = {"segment_len": 8, "chunk_size": 3, "persistent_tokens": 2, "window": 5}
FAMILIES = {
    "swa": ("SA", {"swa": {"window": 5, "sink": 2}}),
    "conv+based": ("CBS", {"conv": {"kernel_size": 4, "expand": 2}, "based": {"feature_dim": 8},
                           "swa": {"window": 6}}),
    "titans_mac": ("TA", {"titans": {"variant": "mac", **TITANS}}),
    "titans_mag": ("T", {"titans": {"variant": "mag", **TITANS}}),
    "titans_mal_mlp": ("TA", {"titans": {"variant": "mal", "memory_depth": 2, "memory_hidden": 24, **TITANS}}),
}
LANDMARK_BLOCK = 6
INIT_STD = 0.1  # larger than the default so every mixer visibly moves the logits (and greedy paths vary)


def load_export(out):
    return AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).eval()


def stepwise_logits(hf, ids: torch.Tensor, prefill: int) -> torch.Tensor:
    """Logits from the exported cache: a prefill of `prefill` tokens, then one token per call. [B, T, vocab]"""
    with torch.no_grad():
        out = hf(ids[:, :prefill], use_cache=True)
        pieces = [out.logits]
        for t in range(prefill, ids.shape[1]):
            out = hf(ids[:, t:t + 1], past_key_values=out.past_key_values, use_cache=True)
            pieces.append(out.logits)
    return torch.cat(pieces, dim=1)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_exports_with_equal_logits_and_generation(tokenizer, tmp_path, family):
    pattern, mixers = FAMILIES[family]
    model = tiny_model(tokenizer.vocab_size, pattern, n_kv_heads=2, mixers=mixers, tie_embeddings=family != "swa",
                       init_std=INIT_STD)
    out = export_model(model, tokenizer, tmp_path / "export", max_positions=128)
    config = json.loads((out / "config.json").read_text())
    assert config["mixer_types"] == list(model.layer_types)
    for name in ("lctrain_ops.py", "lctrain_attention.py", "lctrain_recurrent.py", "lctrain_titans.py"):
        assert (out / name).is_file(), name

    hf = load_export(out)
    ids = torch.randint(0, tokenizer.vocab_size, (2, 24))
    reference = lctrain_logits(model, ids)
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, reference, rtol=0, atol=1e-4)
        imported, _ = lctrain.load_model(out)  # mixer_config holds the mixers' own options: it imports back
        torch.testing.assert_close(imported(ids), reference, rtol=0, atol=1e-5)
    torch.testing.assert_close(stepwise_logits(hf, ids, 7), reference, rtol=0, atol=1e-4)

    prompt = ids[:, :10]
    generated = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False)
    cached = torch.cat([prompt, lctrain_generate(model, prompt, 6)], dim=1)  # lctrain's incremental decoding
    assert torch.equal(generated, cached)
    assert torch.equal(generated, greedy(model, prompt, 6))


def test_landmark_export_uses_the_training_time_path(tokenizer, tmp_path):
    """Vocabulary layout of the landmark recipe: one extra id, the last, is the landmark token."""
    vocab = tokenizer.vocab_size + 1
    mixers = {"landmark": {"block_size": LANDMARK_BLOCK, "retrieve_top_k": 1}}
    model = tiny_model(vocab, "MA", n_kv_heads=2, mixers=mixers, init_std=INIT_STD)
    out = export_model(model, tokenizer, tmp_path / "landmark", max_positions=128)
    config = json.loads((out / "config.json").read_text())
    assert config["landmark_token_id"] == vocab - 1
    assert config["mixer_config"]["landmark"]["block_size"] == LANDMARK_BLOCK

    hf = load_export(out)
    text = torch.randint(0, tokenizer.vocab_size, (2, 20))
    positions = torch.arange(20).expand(2, 20)
    ids = insert_landmarks({"input_ids": text, "labels": text, "position_ids": positions}, vocab - 1,
                           LANDMARK_BLOCK)["input_ids"]
    assert ids.shape[1] == 24 and bool((ids[:, LANDMARK_BLOCK - 1::LANDMARK_BLOCK] == vocab - 1).all())
    reference = lctrain_logits(model, ids)
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, reference, rtol=0, atol=1e-4)
    torch.testing.assert_close(stepwise_logits(hf, ids, 4), reference, rtol=0, atol=1e-4)
    # Cached decoding reads every block, so it equals recomputing the training-time path from scratch
    # (lctrain's own decoding would read only retrieve_top_k blocks).
    prompt = ids[:, :10]
    generated = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False)
    assert torch.equal(generated, greedy(model, prompt, 6))


def test_new_families_run_without_lctrain(tokenizer, tmp_path):
    """Every new mixer in one model (Titans MAC with the MLP memory), run where importing lctrain fails: the
    exported pure-PyTorch ops must reproduce lctrain's logits and greedy decoding."""
    mixers = {"swa": {"window": 5, "sink": 1}, "conv": {"kernel_size": 3}, "based": {"feature_dim": 4},
              "landmark": {"block_size": LANDMARK_BLOCK},
              "titans": {"variant": "mac", "memory_depth": 2, "memory_hidden": 16, **TITANS}}
    model = tiny_model(tokenizer.vocab_size + 1, "SCBMT", mixers=mixers, init_std=INIT_STD)
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
            logits = model.eval()(ids).logits
        prompt = ids[:1, :9]  # random ids may include the pad id: say explicitly that nothing is padding
        generated = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=5,
                                   do_sample=False)
        torch.save({{"logits": logits, "generated": generated}}, {str(tmp_path / "result.pt")!r})
    """))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "LCTRAIN_HF_KERNELS")}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    proc = subprocess.run([sys.executable, "-I", str(script)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = torch.load(tmp_path / "result.pt")
    torch.testing.assert_close(result["logits"], lctrain_logits(model, ids), rtol=0, atol=1e-4)
    assert torch.equal(result["generated"], greedy(model, ids[:1, :9], 5))


def test_bfloat16_export_of_the_new_families_runs(tokenizer, tmp_path):
    mixers = {"landmark": {"block_size": LANDMARK_BLOCK}, "titans": {"variant": "mag", **TITANS}}
    model = tiny_model(tokenizer.vocab_size + 1, "SCBMT", mixers=mixers, init_std=INIT_STD)
    hf = AutoModelForCausalLM.from_pretrained(export_model(model, tokenizer, tmp_path / "bf16", dtype="bfloat16"),
                                              trust_remote_code=True).eval()
    assert hf.dtype == torch.bfloat16
    ids = torch.randint(0, tokenizer.vocab_size, (1, 16))
    with torch.no_grad():
        logits = hf(ids).logits.float()
    assert torch.isfinite(logits).all() and (logits - lctrain_logits(model, ids)).abs().max() < 0.5
    assert hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False).shape == (1, 19)


# ---------------------------------------------------------------------------------------------- ops vs lctrain
def test_pure_torch_ops_match_lctrain_kernels():
    """The exported PyTorch forms against lctrain's reference kernels, continuing from a state / offset where the
    op supports it (the decoding case)."""
    torch.manual_seed(0)
    B, T, H, D = 2, 13, 2, 4
    q, k = torch.randn(B, T, H, D), torch.randn(B, T, H, D)
    v = torch.randn(B, T, H, 3)

    o = ops.windowed_attention(q, k[:, :, :1], v[:, :, :1], torch.arange(T), torch.arange(T), 4, 2, 0.5)
    expected = local_attention(q, k[:, :, :1], v[:, :, :1], 4, 2, 0.5, backend="naive")
    torch.testing.assert_close(o, expected, rtol=0, atol=1e-5)

    head, tail = slice(0, 7), slice(7, T)
    o1, state = ops.torch_taylor_linear_attention(q[:, head], k[:, head], v[:, head], None, chunk=3)
    o2, final = ops.torch_taylor_linear_attention(q[:, tail], k[:, tail], v[:, tail], state, chunk=3)
    expected, expected_state = taylor_linear_attention(q, k, v, output_final_state=True, backend="naive")
    torch.testing.assert_close(torch.cat([o1, o2], dim=1), expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(final, expected_state.float(), rtol=0, atol=1e-4)

    expected = landmark_attention(q, k, v, 4, 0.5, backend="naive")
    for start in (0, 5, 8):  # a prefill, then queries that start mid-block and on a block boundary
        o = ops.torch_landmark_attention(q[:, start:], k, v, start, 4, 0.5)
        torch.testing.assert_close(o, expected[:, start:], rtol=0, atol=1e-5)

    gates = [torch.rand(B, T, H) for _ in range(3)]
    kn, qn = torch.nn.functional.normalize(k, dim=-1), torch.nn.functional.normalize(q, dim=-1)
    vd = torch.randn(B, T, H, D)
    o, state = ops.torch_titans_linear_memory(qn, kn, vd, *gates, 3, None)
    expected, expected_state = titans_linear_memory(qn, kn, vd, *gates, chunk_size=3, output_final_state=True,
                                                    backend="naive")
    torch.testing.assert_close(o, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(state[0], expected_state[0], rtol=0, atol=1e-5)

    weights = (torch.randn(B, H, D, 6) / 2, torch.randn(B, H, 6, D) / 2)
    initial = (weights, tuple(torch.zeros_like(w) for w in weights))
    o, state = ops.torch_titans_mlp_memory(qn, kn, vd, *gates, 3, initial)
    expected, expected_state = mlp_titans_memory(qn, kn, vd, *gates, 3, initial)
    torch.testing.assert_close(o, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(state[0][1], expected_state[0][1], rtol=0, atol=1e-5)
