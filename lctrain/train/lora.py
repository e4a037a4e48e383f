"""LoRA fine-tuning through `peft`: adapters on chosen projections, plus fully trained embeddings and norms
(LongLoRA+: for context extension the low-rank update alone does not close the gap; the embeddings and norms are
a small fraction of the weights and unfrozen).

A LoRA run's checkpoints hold only what is trained (`adapter.safetensors`) and `adapter.json`, which names the
base weights; `lctrain.train.checkpoint.load_merged` rebuilds the base, loads the adapters and folds them into plain `nn.Linear` weights,
so export, evaluation and `init_from` see an ordinary model.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from lctrain.config import ConfigError, LoraConfig

ADAPTER_FILE = "adapter.safetensors"
ADAPTER_META = "adapter.json"


def _peft_config(lora_cfg):
    from peft import LoraConfig as PeftLoraConfig  # imported on use: peft pulls in transformers

    return PeftLoraConfig(r=lora_cfg.r, lora_alpha=lora_cfg.alpha, lora_dropout=lora_cfg.dropout,
                          target_modules=list(lora_cfg.target_modules), bias="none")


def _also_trained(name: str, patterns: list[str]) -> bool:
    """A parameter is trained besides the adapters when a component of its dotted name contains a pattern
    (`embed` -> embed.weight; `norm` -> mixer_norm, mlp_norm, o_norm and the final norm)."""
    parts = name.split(".")
    return any(p in part for part in parts for p in patterns)


def apply_lora(model: nn.Module, lora_cfg) -> nn.Module:
    """Inject adapters in place (LoRA B starts at zero, so the model is unchanged) and set requires_grad: adapters
    and `lora.trainable` parameters train, everything else is frozen. Returns the model."""
    from peft import inject_adapter_in_model

    present = {name.rsplit(".", 1)[-1] for name, mod in model.named_modules() if isinstance(mod, nn.Linear)}
    missing = [t for t in lora_cfg.target_modules if t not in present]
    if missing:
        raise ConfigError(f"lora.target_modules: {missing} match no linear layer of this model "
                          f"(linear layers: {', '.join(sorted(present))})")
    model = inject_adapter_in_model(_peft_config(lora_cfg), model)
    for name, param in model.named_parameters():
        param.requires_grad = "lora_" in name or _also_trained(name, list(lora_cfg.trainable))
    model._lora_cfg = lora_cfg
    return model


def is_lora(model: nn.Module) -> bool:
    return getattr(model, "_lora_cfg", None) is not None


def trained_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """What a LoRA checkpoint stores: every parameter that trains (adapters, embeddings, norms)."""
    return {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}


def save_adapter(model: nn.Module, directory: Path, base: str) -> None:
    save_file(trained_tensors(model), str(directory / ADAPTER_FILE))
    cfg = model._lora_cfg
    meta = {"base": base, "r": cfg.r, "alpha": cfg.alpha, "dropout": cfg.dropout,
            "target_modules": list(cfg.target_modules), "trainable": list(cfg.trainable)}
    (directory / ADAPTER_META).write_text(json.dumps(meta, indent=1))


def load_adapter(model: nn.Module, path: Path) -> None:
    """Load adapter tensors into a model that `apply_lora` prepared; every trained parameter must be present."""
    tensors = load_file(str(path))
    expected = set(trained_tensors(model))
    missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing or unexpected:
        raise ConfigError(f"checkpoint {path}: adapter does not fit this model (missing {missing[:3]}, unexpected "
                          f"{unexpected[:3]}); were lora.* options changed?")
    model.load_state_dict(tensors, strict=False)


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and put the plain `nn.Linear` back; returns the model."""
    from peft.tuners.lora import LoraLayer

    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, LoraLayer):
                child.merge()
                setattr(parent, child_name, child.get_base_layer())
    model._lora_cfg = None
    for param in model.parameters():
        param.requires_grad = True
    return model


def read_meta(adapter: Path) -> dict:
    meta_path = adapter.parent / ADAPTER_META
    try:
        return json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"checkpoint {adapter.parent}: unreadable {ADAPTER_META} ({exc})") from None
