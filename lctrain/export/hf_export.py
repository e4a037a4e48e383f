"""Write a trained lctrain model as a Hugging Face model directory.

    config.json                  LlamaForCausalLM (pure attention) or LctrainForCausalLM with `layer_types`
    model.safetensors            weights (sharded with model.safetensors.index.json above --max-shard-size)
    tokenizer.model, tokenizer.json, tokenizer_config.json, special_tokens_map.json
    generation_config.json
    configuration_lctrain.py, modeling_lctrain.py, lctrain_*.py, tokenization_lctrain.py
                                 hybrid models only (auto_map for the model and the tokenizer, trust_remote_code)
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from lctrain.config import ConfigError
from lctrain.data.tokenizer import Tokenizer
from lctrain.export import hf_config, names
from lctrain.export.run_files import locate
from lctrain.export.tokenizer_files import special_ids, write_tokenizer
from lctrain.models import LanguageModel
from lctrain.train.checkpoint import load_weights

REMOTE_DIR = Path(__file__).resolve().parent / "remote"
# Every module of the remote package except its __init__ (the modeling file imports the others relatively).
REMOTE_FILES = tuple(sorted(p.name for p in REMOTE_DIR.glob("*.py") if p.name != "__init__.py"))
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# Non-persistent buffers the exported modeling code reads from the weights instead of re-deriving them.
EXPORTED_BUFFERS = {"linear": ("log_decay",)}


def hf_state_dict(model: LanguageModel, llama: bool, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    prefix = "self_attn" if llama else "mixer"
    out = {}
    for name, tensor in model.state_dict().items():
        out[names.to_hf(name, prefix)] = tensor.detach().to("cpu", dtype).contiguous()
    for i, block in enumerate(model.layers):
        for buffer in EXPORTED_BUFFERS.get(block.mixer_type, ()):
            out[f"model.layers.{i}.{prefix}.{buffer}"] = getattr(block.mixer, buffer).detach().float().cpu()
    return out


def export_model(model: LanguageModel, tokenizer: Tokenizer, out_dir: str | Path, dtype: str = "float32",
                 max_positions: int = 2048, max_shard_size: str | int = "5GB", remote_code: bool = False) -> Path:
    """Write `model` + `tokenizer` to `out_dir`; returns it. Pure-attention models become plain Llama unless
    `remote_code` asks for the lctrain format. `max_positions` is the training context length; the exported
    limits (config `max_position_embeddings`, tokenizer `model_max_length`) follow from it and the RoPE scaling."""
    from huggingface_hub import save_torch_state_dict

    if dtype not in DTYPES:
        raise ConfigError(f"export --dtype: {dtype!r} is not allowed; expected one of {', '.join(DTYPES)}")
    if model.cfg.attn_plan:
        raise ConfigError(f"export: the model uses a MoA plan (model.attn_plan={model.cfg.attn_plan}); the Hugging "
                          "Face modeling code has no per-head spans, so the export would silently be dense")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"export: {out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    llama = hf_config.is_pure_attention(model.layer_types) and not remote_code
    ids = special_ids(tokenizer)
    build = hf_config.llama_config if llama else hf_config.lctrain_config
    config = build(model, ids, max_positions, dtype)
    # Before config.json: AutoTokenizer reads that file if present.
    write_tokenizer(tokenizer, out, hf_config.max_positions(model, max_positions), remote_code=not llama)
    for stale in out.glob("model*.safetensors*"):  # a previous export with another sharding
        stale.unlink()
    save_torch_state_dict(hf_state_dict(model, llama, DTYPES[dtype]), out, max_shard_size=max_shard_size)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = {**ids, "do_sample": False}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    for name in REMOTE_FILES:
        if llama:
            (out / name).unlink(missing_ok=True)
        else:
            shutil.copyfile(REMOTE_DIR / name, out / name)
    return out


def export_run(source: str | Path, out_dir: str | Path, dtype: str = "float32", max_shard_size: str | int = "5GB",
               remote_code: bool = False) -> Path:
    """A run directory or checkpoint directory -> a Hugging Face model directory."""
    files = locate(source)
    if files.tokenizer is None:
        raise ConfigError(f"export: no tokenizer found for {source} (expected <run.dir>/tokenizer/tokenizer.model "
                          "or the recipe's data.tokenizer)")
    model = LanguageModel(files.model_cfg)
    load_weights(model, files.weights, where="export")
    return export_model(model, Tokenizer.load(files.tokenizer), out_dir, dtype, files.max_positions,
                        max_shard_size, remote_code)
