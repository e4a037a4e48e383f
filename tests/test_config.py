"""Recipe loading, dotted overrides and the one-line errors for malformed recipes."""
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from lctrain.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def test_overrides_and_defaults(tmp_path):
    path = write(tmp_path, """
        model: {d_model: 64, n_heads: 4}
        train: {steps: 10}
    """)
    cfg = load_config(path, ["train.steps=20", "model.n_layers=2", "train.lr=1e-3", "model.pattern=[attn]",
                             "parallel.sp=2", "checkpoint.interval=5", "run.dir=out/x", "data.seq_len=64",
                             "train.seed=7"])
    assert cfg.train.steps == 20 and cfg.model.n_layers == 2 and cfg.train.lr == pytest.approx(1e-3)
    assert cfg.model.pattern == ["attn"] and cfg.parallel.sp == 2 and cfg.checkpoint.interval == 5
    assert cfg.run.dir == "out/x" and cfg.data.seq_len == 64 and cfg.train.seed == 7
    assert cfg.model.d_model == 64  # from the file
    assert cfg.run.name == "recipe"


def test_run_dir_defaults_to_recipe_stem(tmp_path):
    cfg = load_config(write(tmp_path, "train: {steps: 1}\n"))
    assert cfg.run.dir == str(Path("runs") / "recipe")


MALFORMED = [
    # (recipe text, overrides, fragments the one-line message must contain)
    ("train: {stpes: 3}\n", [], ["train.stpes", "did you mean 'train.steps'"]),
    ("modle: {d_model: 3}\n", [], ["modle", "did you mean 'model'"]),
    ("train: {steps: many}\n", [], ["train.steps", "'many'", "integer"]),
    ("train: {lr: -0.1}\n", [], ["train.lr", "-0.1", "positive"]),
    ("parallel: {attn: rign}\n", [], ["parallel.attn", "'rign'", "did you mean 'ring'"]),
    ("parallel: {layout: diagonal}\n", [], ["parallel.layout", "'diagonal'", "zigzag"]),
    ("model: {d_model: 100, n_heads: 3}\n", [], ["model.n_heads", "100"]),
    ("model: {n_heads: 4, n_kv_heads: 3}\n", [], ["model.n_kv_heads", "3"]),
    ("data: {seq_len: 1}\n", [], ["data.seq_len", ">= 2"]),
    ("data: {sources: [{type: jsonl}]}\n", [], ["data.sources[0].path", "jsonl"]),
    ("data: {sources: [{type: csv, path: a.csv}]}\n", [], ["data.sources[0].type", "'csv'"]),
    ("data: {tokenizer: /nonexistent/x.model}\n", [], ["data.tokenizer", "not found"]),
    ("train: {tie: 1}\n", [], ["train.tie"]),
    ("model: {tie_embeddings: maybe}\n", [], ["model.tie_embeddings", "true or false"]),
    ("train: 5\n", [], ["train", "mapping"]),
    ("- a\n- b\n", [], ["top level must be a mapping"]),
    ("train: {steps: 3\n", [], ["YAML syntax error", "line"]),
    ("train: {steps: 3}\n", ["train.steps"], ["dotted.key=value"]),
    ("train: {steps: 3}\n", ["train.steps.x=1"], ["train.steps", "not a section"]),
    ("train: {steps: 3}\n", ["checkpoint.keep_last=0"], ["checkpoint.keep_last", "positive"]),
]


@pytest.mark.parametrize("text,overrides,fragments", MALFORMED)
def test_malformed_recipes_give_one_line_errors(tmp_path, text, overrides, fragments):
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text), overrides)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def test_missing_recipe(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize("args,fragment", [
    (["recipes/nope.yaml"], "file not found"),
    (["recipes/tiny.yaml", "train.stpes=3"], "did you mean 'train.steps'"),
    (["recipes/tiny.yaml", "parallel.attn=rign"], "parallel.attn"),
])
def test_cli_exit_code_2_without_traceback(args, fragment):
    proc = subprocess.run([sys.executable, "-m", "lctrain", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and fragment in lines[0], proc.stderr


def test_cli_mixer_option_typo(tmp_path):
    path = write(tmp_path, "model: {mixers: {attn: {rope_thta: 5}}, vocab_size: 64}\n")
    from lctrain.models import LanguageModel
    cfg = load_config(path)
    with pytest.raises(ConfigError, match="model.mixers.attn.rope_thta.*did you mean 'rope_theta'"):
        LanguageModel(cfg.model)
