"""`checkpoint.init_from` for a model built on `meta` (the fsdp engine): the base weights are read piece by piece.

`lctrain.train.meta_init.materialize` fills one piece (a block, the embedding, ...) at a time; with a source, the
piece's weights are read from the checkpoint instead of initialised, so a fine-tuning run never holds the whole base
on one host either. Readable piece by piece: a `.safetensors` file (an lctrain run or checkpoint), a sharded
checkpoint's `dcp/` and an `hf:` directory (its `*.safetensors` files, sharded or not, names converted by
`lctrain.export.names`). From safetensors files each rank reads only the rows of its own shards (`local_reader`),
so the bytes a rank reads are its share of the model. A LoRA checkpoint as the source is its base read so, with the
adapters merged into each tensor as it is read (`_LoraMerged`); only a LoRA checkpoint whose base is itself one is
loaded whole on the host as before (`open_source` returns None and says so).

LoRA adapters added to the meta model are initialised as `apply_lora` initialises them (seeded per module), after
their piece's base weights are read.
"""
from __future__ import annotations

import sys
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
    """Tensors of one or more safetensors files by lctrain name; whole tensors or row ranges (`read_rows`).
    `bytes_read` counts what was read (the test's measure that a rank reads its share only)."""
    grows_vocab = False  # a larger embedding than the checkpoint's (only hf: sources allow it, as on the host path)

    def __init__(self, path: Path, files: list[Path] | None = None, rename=None):
        from safetensors import safe_open
        self.path, self.bytes_read = path, 0
        self.where, self.shapes = {}, {}
        for file in files or [path]:
            handle = safe_open(str(file), framework="pt", device="cpu")
            for key in handle.keys():
                name = rename(key) if rename else key
                if name is None:
                    continue
                self.where[name] = (handle, key)
                self.shapes[name] = tuple(handle.get_slice(key).get_shape())

    def _count(self, tensor: torch.Tensor) -> torch.Tensor:
        self.bytes_read += tensor.numel() * tensor.element_size()
        return tensor

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        return {n: self._count(self.where[n][0].get_tensor(self.where[n][1])) for n in names}

    def read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        handle, key = self.where[name]
        return self._count(handle.get_slice(key)[start:stop])


class _HF(_Safetensors):
    """A Hugging Face directory (`save_pretrained`, one file or shards named by model.safetensors.index.json)."""
    grows_vocab = True

    def __init__(self, directory: Path):
        from lctrain.export.hf_import import _weight_files
        super().__init__(directory, _weight_files(directory), rename=self._rename)

    @staticmethod
    def _rename(key: str) -> str | None:
        from lctrain.export import names
        if key.endswith("rotary_emb.inv_freq"):  # recomputed, never learned
            return None
        try:
            return names.from_hf(key)
        except KeyError as exc:
            raise ConfigError(f"{WHERE}: {exc.args[0]}") from None


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
        return _HF(Path(source[3:]))
    from lctrain.train.checkpoint import resolve_weights
    try:
        weights = resolve_weights(source)
    except Exception:  # noqa: BLE001 - reported by load_weights on the host path, in its usual words
        return None
    if weights.name == "adapter.safetensors" or (weights.is_dir() and (weights.parent / "adapter.json").is_file()):
        return _merged(source, weights)
    if weights.is_dir():
        return _Sharded(weights)
    return _Safetensors(weights)


def _merged(source: str, adapter: Path):
    """A LoRA checkpoint: its base read piece by piece with the adapters merged per tensor; None (loaded whole on
    the host, said in one line) when its base cannot be read so (a LoRA checkpoint itself, or unresolvable)."""
    from lctrain.train.lora import read_meta
    meta = read_meta(adapter)
    try:
        base = open_source(meta["base"]) if not _is_lora(meta["base"]) else None
    except ConfigError:
        base = None
    if base is None:
        print(f"{WHERE}: {source} is a LoRA checkpoint whose base ({meta['base']}) is not read piece by piece: base "
              "and adapters are loaded whole on the host and merged there", file=sys.stderr, flush=True)
        return None
    return _LoraMerged(base, adapter, float(meta["alpha"]) / int(meta["r"]))


def _is_lora(source: str) -> bool:
    from lctrain.train.checkpoint import resolve_weights
    if source.startswith("hf:"):
        return False
    try:
        weights = resolve_weights(source)
    except Exception:  # noqa: BLE001 - reported by the host path
        return False
    return weights.name == "adapter.safetensors" or (weights.is_dir() and (weights.parent / "adapter.json").is_file())


class _LoraMerged:
    """A LoRA checkpoint's weights as `load_merged` makes them (W + alpha/r * B @ A per adapted linear, the
    trained embeddings and norms as saved), tensor by tensor or row range by row range over its base's reader.
    The adapters and trained tensors (small next to the base) are read whole by every rank."""

    def __init__(self, base, adapter: Path, scale: float):
        self.base, self.path, self.scale = base, adapter, scale
        if adapter.is_dir():
            sharded = _Sharded(adapter)
            trained = sharded.read(sorted(sharded.shapes))
        else:
            from safetensors.torch import load_file
            trained = load_file(str(adapter))
        self.pairs, self.trained = {}, {}
        for name, value in trained.items():
            if ".lora_A." in name:  # layers.0.mixer.q_proj.lora_A.default.weight -> layers.0.mixer.q_proj.weight
                stem = name.split(".lora_A.")[0]
                self.pairs[f"{stem}.weight"] = (value, trained[name.replace(".lora_A.", ".lora_B.")])
            elif ".lora_" not in name:
                self.trained[base_name(name)] = value
        self.shapes = base.shapes
        self.grows_vocab = getattr(base, "grows_vocab", False)
        if hasattr(base, "read_rows"):
            self.read_rows = self._read_rows

    @property
    def bytes_read(self) -> int:
        return self.base.bytes_read

    def _merge(self, name: str, value: torch.Tensor, rows: slice) -> torch.Tensor:
        if name in self.trained:
            return self.trained[name][rows]
        if name in self.pairs:  # as peft's merge: weight += (B @ A) * scaling
            lora_a, lora_b = self.pairs[name]
            value = value + (lora_b[rows] @ lora_a) * self.scale
        return value

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        from_base = [n for n in names if n not in self.trained]
        values = self.base.read(from_base) if from_base else {}
        return {n: self._merge(n, values.get(n), slice(None)) for n in names}

    def _read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        value = None if name in self.trained else self.base.read_rows(name, start, stop)
        return self._merge(name, value, slice(start, stop))


def check(model: nn.Module, reader) -> None:
    """Every base parameter of the (meta) model is in the source with its shape: one line naming the first that
    is not, before anything is allocated."""
    missing, differing, own = [], [], set()
    for name, param in model.named_parameters():
        if "lora_" in name:
            continue
        own.add(base_name(name))
        stored = reader.shapes.get(base_name(name))
        if stored is None:
            missing.append(base_name(name))
        elif stored != tuple(param.shape) and not (getattr(reader, "grows_vocab", False) and _fewer_rows(name, stored,
                                                                                                     param.shape)):
            differing.append(f"{base_name(name)} has shape {list(stored)} in the checkpoint but "
                             f"{list(param.shape)} in this model")
    if missing or differing:
        what = differing[0] if differing else f"missing {missing[:5]} weights"
        raise ConfigError(f"{WHERE}: checkpoint {reader.path}: {what}; was it saved from a model with a different "
                          "config?")
    if isinstance(getattr(reader, "base", reader), _HF):
        _check_hf_extras(getattr(reader, "base", reader), own)


def _fewer_rows(name: str, stored: tuple, shape) -> bool:
    """A larger vocabulary than the checkpoint's: rows past it keep the model's init (as `load_hf_weights`)."""
    return name.endswith(("embed.weight", "lm_head.weight")) and stored[1:] == tuple(shape[1:]) \
        and stored[0] < shape[0]


def _check_hf_extras(reader, own: set) -> None:
    """What `load_hf_weights` refuses: weights the model lacks (lctrain's layer-index decays aside), and an
    lm_head that differs from the embedding when the model ties them (compared in row blocks, never whole)."""
    extra = sorted(n for n in reader.shapes if n not in own and not n.endswith("log_decay") and n != "lm_head.weight")
    if extra:
        raise ConfigError(f"{WHERE}: {reader.path} does not match the model: unexpected {extra[:4]}")
    if "lm_head.weight" in reader.shapes and "lm_head.weight" not in own:
        rows = reader.shapes["lm_head.weight"][0]
        for start in range(0, rows, 4096):
            stop = min(start + 4096, rows)
            if not torch.equal(reader.read_rows("lm_head.weight", start, stop),
                               reader.read_rows("embed.weight", start, stop)):
                raise ConfigError(f"{WHERE}: {reader.path} has an untied lm_head; set model.tie_embeddings=false")


def filler(model: nn.Module, reader):
    """`fill(path, piece)` for `materialize`: the piece's base weights from the source, then its adapters."""
    def fill(path: str, piece: nn.Module) -> None:
        params = dict(piece.named_parameters())
        wanted = {name: base_name(f"{path}.{name}") for name in params if "lora_" not in name}
        values = reader.read(sorted(set(wanted.values())))
        if any(values[stored].shape != params[name].shape for name, stored in wanted.items()):
            model.init_module_(path, piece)  # a larger vocabulary: the rows past the checkpoint's keep their init
        with torch.no_grad():
            for name, stored in wanted.items():
                params[name][:values[stored].shape[0]].copy_(values[stored])
        if any("lora_" in name for name in params):
            from lctrain.train.lora import init_adapters_
            init_adapters_(piece, prefix=path, seed=model.init_seed)
    return fill


def local_reader(model: nn.Module, reader):
    """`read_local(path, piece, full_piece)` for `materialize`: each sharded base weight of the piece gets only
    this rank's rows from the source (safetensors slices), its adapters are initialised on the host (small) and
    sliced. False (the piece is filled whole by `filler`) where the source cannot slice, the shapes differ (a larger
    vocabulary) or a placement is not a row split."""
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    from lctrain.train.meta_init import place_full

    def read_local(path: str, piece: nn.Module, full_piece: nn.Module) -> bool:
        if not hasattr(reader, "read_rows"):
            return False
        params = dict(piece.named_parameters())
        for name, param in params.items():
            if "lora_" in name:
                continue
            if reader.shapes[base_name(f"{path}.{name}")] != tuple(param.shape) or not isinstance(param, DTensor) \
                    or param.dim() == 0 or any(not (isinstance(p, Replicate) or p == Shard(0)) for p in param.placements):
                return False
        with torch.no_grad():
            for name, param in params.items():
                if "lora_" in name:
                    continue
                local_shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh,
                                                                           param.placements)
                if local_shape[0]:
                    rows = reader.read_rows(base_name(f"{path}.{name}"), offset[0], offset[0] + local_shape[0])
                    param.to_local().copy_(rows)
            adapters = [n for n in params if "lora_" in n]
            if adapters:
                from peft.tuners.lora import LoraLayer

                from lctrain.train.lora import init_adapters_
                for module in full_piece.modules():
                    if isinstance(module, LoraLayer):
                        module.lora_A.to_empty(device="cpu")
                        module.lora_B.to_empty(device="cpu")
                init_adapters_(full_piece, prefix=path, seed=model.init_seed)
                full = dict(full_piece.named_parameters())
                for name in adapters:
                    place_full(params[name], full[name], param_device(params[name]))
                full_piece.to("meta")
        return True
    return read_local


def param_device(param) -> torch.device:
    return param.to_local().device if hasattr(param, "to_local") else param.device
