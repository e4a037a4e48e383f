"""recipes/sinklora.yaml and the MoA pipeline run end to end at tiny size: base run -> SinkLoRA fine-tune ->
eval/export, and base run -> moa profile -> moa search -> eval with the plan; errors exit 2 in one line."""
import json
import subprocess
import sys

import pytest
import torch

from tests.train.conftest import ROOT, child_env, run_lctrain

BASE = ["model.pattern=A", "model.n_heads=4", "train.steps=3"]


@pytest.fixture(scope="module")
def base_run(cache_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("recipes") / "base"
    run_lctrain(cache_dir, run, *BASE)
    return run


def lctrain(cache_dir, *args, expect: int = 0) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "lctrain", *map(str, args)], cwd=ROOT, env=child_env(cache_dir),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == expect, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.slow  # ~11 s; the SinkLoRA fine-tune itself is also in tests/export/test_hf_import.py
def test_sinklora_recipe_extends_a_run(cache_dir, base_run, tmp_path):
    run = tmp_path / "sinklora"
    # The recipe itself, shrunk: the model's shape and tokenizer follow the base run.
    proc = subprocess.run([sys.executable, "-m", "lctrain", "recipes/sinklora.yaml", f"run.dir={run}",
                           f"checkpoint.init_from={base_run}", "data.seq_len=128", "data.max_documents=40",
                           "train.steps=2", "train.eval_interval=0", "train.eval_batches=1", "logging.progress=plain"],
                          cwd=ROOT, env=child_env(cache_dir), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "LoRA r=8" in proc.stdout
    saved = (run / "config.yaml").read_text()
    assert "d_model: 64" in saved and "mode: sf_attn" in saved and "rope_scaling: 4.0" in saved
    assert (run / "checkpoints" / "step-2" / "adapter.safetensors").is_file()
    out = tmp_path / "ppl.json"
    lctrain(cache_dir, "eval", run, "--task", "ppl", "--lengths", "64,128", "--no-progress", "--out", out)
    ppl = json.loads(out.read_text())["results"]
    assert [r["length"] for r in ppl] == [64, 128] and all(r["ppl"] > 1 for r in ppl)


@pytest.mark.slow  # ~17 s; profile, search and apply are checked on their own in tests/moa
def test_moa_profile_search_and_evaluate(cache_dir, base_run, tmp_path):
    profile, plan = tmp_path / "profile.pt", tmp_path / "plan.json"
    lctrain(cache_dir, "moa", "profile", base_run, "--lengths", "48,64", "--docs", "2", "--sink", "4",
            "--alphas", "0,8", "--betas", "0,0.5,1", "--response", "8", "--no-progress", "--out", profile)
    result = torch.load(profile, weights_only=True)
    assert result["layers"] == [0, 1] and tuple(result["loss"].shape) == (2, 4, 6, 2)
    proc = lctrain(cache_dir, "moa", "search", profile, "--density", "0.6", "--out", plan)
    assert "achieved density" in proc.stdout
    written = json.loads(plan.read_text())
    assert all(d <= 0.6 + 1e-9 for d in written["summary"]["achieved_density"])
    out = tmp_path / "ppl.json"
    lctrain(cache_dir, "eval", base_run, "--task", "ppl", "--lengths", "64,128", "--attn-plan", plan,
            "--no-progress", "--out", out)
    assert json.loads(out.read_text())["attn_plan"] == str(plan)
    out = tmp_path / "passkey.json"  # H2O-bounded decoding
    lctrain(cache_dir, "eval", base_run, "--task", "passkey", "--lengths", "96", "--trials", "2", "--kv-budget", "24",
            "--no-progress", "--out", out)
    assert json.loads(out.read_text())["kv_budget"] == 24
    # a plan trains too
    run_lctrain(cache_dir, tmp_path / "planned", *BASE, f"model.attn_plan={plan}", "train.steps=1")


@pytest.mark.parametrize("args, message", [
    (["moa", "search", "missing.pt", "--density", "0.5", "--out", "p.json"], "profile missing.pt: file not found"),
    (["moa", "search", "x.pt", "--density", "2", "--out", "p.json"], "density"),
    (["moa", "profile", "nowhere", "--lengths", "64", "--out", "p.pt"], "nowhere does not exist"),
    (["moa", "profile", "nowhere", "--lengths", "x", "--out", "p.pt"], "--lengths"),
    (["eval", "nowhere", "--task", "ppl", "--attn-plan", "p.json"], "nowhere does not exist"),
    (["recipes/tiny.yaml", "model.attn_plan=nowhere.json"], "model.attn_plan: file not found"),
    (["eval", "nowhere", "--task", "passkey", "--kv-recent", "4"], "--kv-recent: needs --kv-budget"),
    (["recipes/tiny.yaml", "lora.enabled=true"], "lora.enabled: LoRA fine-tunes a trained model"),
])
def test_bad_input_is_one_line_and_exit_2(capsys, monkeypatch, tmp_path, args, message):
    from lctrain.cli import main
    monkeypatch.chdir(tmp_path)
    recipe = [str(ROOT / args[0])] if args[0].endswith(".yaml") else [args[0]]
    assert main(recipe + args[1:]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_init_from_a_missing_run_and_a_bad_mode_are_config_errors(cache_dir, tmp_path):
    from lctrain.config import ConfigError, ModelConfig
    from lctrain.models import LanguageModel
    with pytest.raises(ConfigError, match="model.mixers.attn.mode: 'sparse' is not allowed"):
        LanguageModel(ModelConfig(vocab_size=64, d_model=32, n_layers=1, mixers={"attn": {"mode": "sparse"}}))
    with pytest.raises(ConfigError, match="model.mixers.attn.group_size"):
        LanguageModel(ModelConfig(vocab_size=64, d_model=32, n_layers=1, mixers={"attn": {"group_size": 3}}))
    proc = subprocess.run([sys.executable, "-m", "lctrain", "recipes/sinklora.yaml", f"run.dir={tmp_path / 'r'}",
                           "checkpoint.init_from=nowhere"], cwd=ROOT, env=child_env(cache_dir), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "checkpoint.init_from: nowhere does not exist" in proc.stderr.splitlines()[-1]
    assert "Traceback" not in proc.stderr
