"""`python -m lctrain export` on a trained run, and `lctrain.load_model` on run, checkpoint and export dirs."""
import subprocess
import sys

import pytest
import torch

import lctrain
from tests.train.conftest import ROOT, child_env, run_lctrain

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402


def export_cmd(*args) -> list[str]:
    return [sys.executable, "-m", "lctrain", "export", *map(str, args)]


def test_export_a_trained_run_and_load_it_everywhere(cache_dir, tmp_path):
    run = tmp_path / "run"
    run_lctrain(cache_dir, run, "train.steps=3", "model.pattern=GLA", "model.n_layers=3")
    assert (run / "tokenizer" / "tokenizer.model").is_file()  # written at the start of the run
    out = tmp_path / "hf"
    proc = subprocess.run(export_cmd(run, out, "--dtype", "float32"), cwd=ROOT, env=child_env(cache_dir),
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]

    from_run, tok = lctrain.load_model(run)
    from_ckpt, _ = lctrain.load_model(run / "checkpoints" / "step-3")
    from_export, tok_export = lctrain.load_model(out)
    hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).eval()
    text = "import os\nprint(os.getcwd())\n"
    ids = torch.tensor([[tok.bos_id] + tok.encode(text)])
    assert tok_export.encode(text) == tok.encode(text)
    assert AutoTokenizer.from_pretrained(out, trust_remote_code=True)(text).input_ids == ids[0].tolist()
    with torch.no_grad():
        reference = from_run(ids)
        assert reference.shape == (1, ids.shape[1], from_run.config.vocab_size)
        assert torch.equal(from_ckpt(ids), reference)
        torch.testing.assert_close(from_export(ids), reference, rtol=0, atol=1e-5)
        torch.testing.assert_close(hf(ids).logits, reference, rtol=0, atol=1e-4)

    bf16 = tmp_path / "hf-bf16"
    proc = subprocess.run(export_cmd(run / "checkpoints" / "step-3", bf16, "--dtype", "bfloat16"), cwd=ROOT,
                          env=child_env(cache_dir), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert '"torch_dtype": "bfloat16"' in (bf16 / "config.json").read_text()
    half = AutoModelForCausalLM.from_pretrained(bf16, trust_remote_code=True).eval()
    assert half.dtype == torch.bfloat16
    with torch.no_grad():
        logits = half(ids).logits.float()
    assert torch.isfinite(logits).all() and (logits - reference).abs().max() < 0.5


@pytest.mark.parametrize("args, message", [
    (["{tmp}/missing", "{tmp}/out"], "error: export: {tmp}/missing does not exist"),
    (["{tmp}", "{tmp}/out"], "error: export: no model weights under {tmp}"),
])
def test_bad_export_input_is_one_line_and_exit_2(cache_dir, tmp_path, args, message):
    proc = subprocess.run(export_cmd(*[a.format(tmp=tmp_path) for a in args]), cwd=ROOT, env=child_env(cache_dir),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message.format(tmp=tmp_path)), proc.stderr
