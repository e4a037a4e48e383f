"""`checkpoint.init_from` for a model built on `meta` (the fsdp engine): the base weights are read piece by piece.

`lctrain.train.meta_init.materialize` fills one piece (a block, the embedding, ...) at a time; with a source, the
piece's weights are read from the checkpoint instead of initialised, so a fine-tuning run never holds the whole base
on one host either. Readable piece by piece: a `.safetensors` file (an lctrain run or checkpoint) and a sharded
checkpoint's `dcp/`. Other sources (`hf:` directories, whose names are converted, and LoRA checkpoints, whose
adapters must be merged into their base) are loaded whole on the host as before (`open_source` returns None).

LoRA adapters added to the meta model are initialised as `apply_lora` initialises them (seeded per module), after
their piece's base weights are read.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.nn as nn

from lctrain.config import ConfigError

WHERE = "checkpoint.init_from"


def base_name(name: str) -> str:
    """A LoRA-wrapped parameter's name in the base model (`q_proj.base_layer.weight` -> `q_proj.weight`)."""
    return name.replace(".base_layer.", ".")


class _Safetensors:
    def __init__(self, path: Path):
        from safetensors import safe_open
        self.path = path
        self.file = safe_open(str(path), framework="pt", device="cpu")
        self.shapes = {k: tuple(self.file.get_slice(k).get_shape()) for k in self.file.keys()}

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        return {n: self.file.get_tensor(n) for n in names}


class _Sharded:
    """A DCP checkpoint's model tensors, read in this process alone (only the ones asked for)."""

    def __init__(self, path: Path):
        from torch.distributed.checkpoint import FileSystemReader

        from lctrain.train.dcp_checkpoint import MODEL_KEY
        self.path, self.key = path, MODEL_KEY
        stored = FileSystemReader(str(path)).read_metadata().state_dict_metadata
        prefix = f"{MODEL_KEY}."
        self.shapes = {k[len(prefix):]: tuple(v.size) for k, v in stored.items()
                       if k.startswith(prefix) and hasattr(v, "size")}
        self.dtypes = {k[len(prefix):]: v.properties.dtype for k, v in stored.items()
                       if k.startswith(prefix) and hasattr(v, "size")}

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        import torch.distributed.checkpoint as dcp
        state = {self.key: {n: torch.empty(self.shapes[n], dtype=self.dtypes[n]) for n in names}}
        with warnings.catch_warnings():  # DCP warns that it reads in one process: that is the point here
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(state, checkpoint_id=str(self.path), no_dist=True)
        return state[self.key]


def open_source(source: str):
    """A piece-by-piece reader of `source`'s weights, or None when it must be loaded whole (see above) or cannot
    be resolved (then the host path reports the problem as before)."""
    if source.startswith("hf:"):
        return None
    from lctrain.train.checkpoint import resolve_weights
    try:
        weights = resolve_weights(source)
    except Exception:  # noqa: BLE001 - reported by load_weights on the host path, in its usual words
        return None
    if weights.is_dir():
        if (weights.parent / "adapter.json").is_file():
            return None
        return _Sharded(weights)
    if weights.name == "adapter.safetensors":
        return None
    return _Safetensors(weights)


def check(model: nn.Module, reader) -> None:
    """Every base parameter of the (meta) model is in the source with its shape: one line naming the first that
    is not, before anything is allocated."""
    missing, differing = [], []
    for name, param in model.named_parameters():
        if "lora_" in name:
            continue
        stored = reader.shapes.get(base_name(name))
        if stored is None:
            missing.append(base_name(name))
        elif stored != tuple(param.shape):
            differing.append(f"{base_name(name)} has shape {list(stored)} in the checkpoint but "
                             f"{list(param.shape)} in this model")
    if missing or differing:
        what = differing[0] if differing else f"missing {missing[:5]} weights"
        raise ConfigError(f"{WHERE}: checkpoint {reader.path}: {what}; was it saved from a model with a different "
                          "config?")


def filler(model: nn.Module, reader):
    """`fill(path, piece)` for `materialize`: the piece's base weights from the source, then its adapters."""
    def fill(path: str, piece: nn.Module) -> None:
        params = dict(piece.named_parameters())
        wanted = {name: base_name(f"{path}.{name}") for name in params if "lora_" not in name}
        values = reader.read(sorted(set(wanted.values())))
        with torch.no_grad():
            for name, stored in wanted.items():
                params[name].copy_(values[stored])
        if any("lora_" in name for name in params):
            from lctrain.train.lora import init_adapters_
            init_adapters_(piece, prefix=path, seed=model.init_seed)
    return fill
