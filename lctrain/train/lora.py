"""LoRA fine-tuning through `peft`: adapters on chosen projections, plus fully trained embeddings and norms
(LongLoRA+: for context extension the low-rank update alone does not close the gap; the embeddings and norms are
a small fraction of the weights and unfrozen).

A LoRA run's checkpoints hold only what is trained (`adapter.safetensors`, or under the fsdp engine the same
tensors as DCP shards in `dcp/`) and `adapter.json`, which names the base weights;
`lctrain.train.checkpoint.load_merged` rebuilds the base, loads the adapters and folds them into plain `nn.Linear`
weights, so export, evaluation and `init_from` see an ordinary model.

Adapters are initialised from generators seeded by the model's init seed and their module path (as the model's own
weights are, `lctrain.models.init`), not from torch's global generator: their values do not depend on what was
drawn before, so every engine, world size and build order starts from the same adapters.
"""
from __future__ import annotations

import json
import math
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
    init_adapters_(model)
    for name, param in model.named_parameters():
        param.requires_grad = "lora_" in name or _also_trained(name, list(lora_cfg.trainable))
    model._lora_cfg = lora_cfg
    return model


def init_adapters_(model: nn.Module, prefix: str = "", seed: int | None = None) -> None:
    """peft's rule (A ~ kaiming-uniform as nn.Linear, B = 0), each A drawn from its own seeded CPU generator.
    `model` may be one piece of the model at dotted `prefix` (meta initialisation), with the model's `seed`."""
    from peft.tuners.lora import LoraLayer

    from lctrain.models.init import module_seed

    seed = int(getattr(model, "init_seed", 0) if seed is None else seed)
    for path, module in model.named_modules(prefix=prefix):
        if not isinstance(module, LoraLayer) or any(a.weight.is_meta for a in module.lora_A.values()):
            continue  # on meta: initialised when materialised, piece by piece (the base may stay on meta then)
        for adapter, linear in module.lora_A.items():
            with torch.random.fork_rng(devices=[]), torch.no_grad():
                torch.manual_seed(module_seed(seed, f"{path}.lora_A.{adapter}"))
                value = torch.empty(linear.weight.shape, dtype=torch.float32)
                nn.init.kaiming_uniform_(value, a=math.sqrt(5))
                linear.weight.copy_(value)
        for linear in module.lora_B.values():
            with torch.no_grad():
                linear.weight.zero_()


def is_lora(model: nn.Module) -> bool:
    return getattr(model, "_lora_cfg", None) is not None


def trained_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """What a LoRA checkpoint stores: every parameter that trains (adapters, embeddings, norms)."""
    return {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}


def save_adapter(model: nn.Module, directory: Path, base: str) -> None:
    save_file(trained_tensors(model), str(directory / ADAPTER_FILE))
    write_adapter_meta(model, directory, base)


def write_adapter_meta(model: nn.Module, directory: Path, base: str) -> None:
    """adapter.json: the base weights and the LoRA settings, enough to rebuild the adapter model."""
    cfg = model._lora_cfg
    meta = {"base": base, "r": cfg.r, "alpha": cfg.alpha, "dropout": cfg.dropout,
            "target_modules": list(cfg.target_modules), "trainable": list(cfg.trainable)}
    (directory / ADAPTER_META).write_text(json.dumps(meta, indent=1))


def load_adapter(model: nn.Module, path: Path) -> None:
    """Load adapter tensors into a model that `apply_lora` prepared; every trained parameter must be present.
    `path` is adapter.safetensors, or the `dcp/` directory of a sharded (fsdp) checkpoint."""
    expected = {n for n, p in model.named_parameters() if p.requires_grad}
    if Path(path).is_dir():
        from lctrain.train.dcp_checkpoint import load_full_weights
        try:
            load_full_weights(model, Path(path), names=expected)
        except ValueError as exc:
            raise ConfigError(f"{exc} (adapter; were lora.* options changed?)") from None
        return
    tensors = load_file(str(path))
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
