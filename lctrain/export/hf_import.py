"""Start training from a local Hugging Face checkpoint (`checkpoint.init_from: hf:PATH`).

Supported: Llama-family decoders (`llama`, `mistral` without sliding window) and lctrain's own exports. The
recipe's `model.*` keys follow the checkpoint: a key still at its default takes the checkpoint's value; a key the
recipe set to something else is a contradiction and stops the run with one line naming it.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors import safe_open

from lctrain.config import ConfigError, ModelConfig
from lctrain.export import hf_config, names

WHERE = "checkpoint.init_from"


def _weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / s for s in shards]
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    raise ConfigError(f"{WHERE}: no model.safetensors (or index) in {path}; save the model with "
                      "save_pretrained(safe_serialization=True)")


def read_hf_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """All weights of a Hugging Face directory, renamed to lctrain's names."""
    out = {}
    for file in _weight_files(Path(path)):
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                if key.endswith("rotary_emb.inv_freq"):  # recomputed, never learned
                    continue
                try:
                    out[names.from_hf(key)] = handle.get_tensor(key)
                except KeyError as exc:
                    raise ConfigError(f"{WHERE}: {exc.args[0]}") from None
    return out


def follow_hf_config(model_cfg: ModelConfig, path: str | Path) -> dict:
    """Set `model_cfg`'s architecture keys from the checkpoint's config.json (in place); returns that config."""
    hf = hf_config.read_hf_config(path)
    hf_config.check_supported(hf, WHERE)
    adopt_model_keys(model_cfg, hf_config.model_keys_from_hf(hf), path)
    return hf


def adopt_model_keys(model_cfg: ModelConfig, wanted: dict, source) -> None:
    """The recipe's model keys follow a checkpoint's where the recipe leaves the default; a recipe value that
    contradicts the checkpoint is an error (the weights would not fit)."""
    defaults = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
                for f in dataclasses.fields(ModelConfig)}
    for key, value in wanted.items():
        current = getattr(model_cfg, key)
        if current == value or current == defaults[key]:
            setattr(model_cfg, key, value)
        elif key == "vocab_size" and current > value:
            continue  # a larger embedding is allowed: rows past the checkpoint's vocabulary start fresh
        else:
            raise ConfigError(f"model.{key}: the recipe says {current!r} but the checkpoint {source} has {value!r}; "
                              f"remove model.{key} from the recipe (it follows the checkpoint)")


def load_hf_weights(model, path: str | Path) -> None:
    """Copy a Hugging Face checkpoint's weights into an lctrain `LanguageModel` built with a matching config."""
    tensors = read_hf_tensors(path)
    own = model.state_dict()
    if "lm_head.weight" in tensors and model.lm_head is None:
        head, embed = tensors.pop("lm_head.weight"), tensors.get("embed.weight")
        if embed is not None and not torch.equal(head, embed):
            raise ConfigError(f"{WHERE}: {path} has an untied lm_head; set model.tie_embeddings=false")
    for name in [n for n in tensors if n not in own and n.endswith("log_decay")]:
        tensors.pop(name)  # lctrain derives these decays from the layer index
    missing = sorted(set(own) - set(tensors) - ({"lm_head.weight"} if model.lm_head is None else set()))
    unexpected = sorted(set(tensors) - set(own))
    if missing or unexpected:
        raise ConfigError(f"{WHERE}: {path} does not match the model: missing {missing[:4]}, unexpected "
                          f"{unexpected[:4]}")
    with torch.no_grad():
        for name, tensor in tensors.items():
            target = own[name]
            if target.shape != tensor.shape:
                if name.endswith(("embed.weight", "lm_head.weight")) and target.shape[1:] == tensor.shape[1:] \
                        and target.shape[0] > tensor.shape[0]:
                    target[:tensor.shape[0]].copy_(tensor)  # larger vocabulary: keep the extra rows' init
                    continue
                raise ConfigError(f"{WHERE}: weight {name} has shape {tuple(tensor.shape)} in {path}, the model "
                                  f"expects {tuple(target.shape)}")
            target.copy_(tensor)


def follow_hf_checkpoint(cfg, path: str | Path) -> None:
    """Recipe side of `hf:PATH`: the model keys follow the checkpoint, and its tokenizer is used when the
    recipe names none (token ids must mean what the checkpoint learned)."""
    path = Path(path)
    if not path.is_dir():
        raise ConfigError(f"{WHERE}: hf:{path} is not a directory (expected a local save_pretrained directory)")
    follow_hf_config(cfg.model, path)
    if not cfg.data.tokenizer and (path / "tokenizer.model").is_file():
        cfg.data.tokenizer = str(path / "tokenizer.model")
