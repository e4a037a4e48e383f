"""Atomic, complete checkpoints: `<run.dir>/checkpoints/step-<N>/` plus a `latest` pointer.

Layout of one checkpoint:
    model.safetensors       weights (rank 0)
    optimizer.pt            optimizer state (rank 0; tensors and plain containers only)
    trainer.json            step, tokens seen, scheduler state, skipped steps, world layout
    rank-<r>.pt             per-rank RNG states (python, numpy, torch, cuda) and data-loader state
    config.yaml             the resolved config
    deepspeed/              DeepSpeed engines only: its own model/optimizer (ZeRO partition) files, in place of
                            optimizer.pt; model.safetensors is still written, so export and init_from work alike

Everything is written into `.tmp-step-<N>/` first; rank 0 renames it to `step-<N>/` once every rank has finished
and only then replaces `latest` (write-new-then-rename), so a kill at any moment leaves `latest` naming a complete
checkpoint. Loading uses safetensors and `torch.load(weights_only=True)`: no arbitrary pickles.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

LATEST = "latest"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "python": list(random.getstate()[1]) + [random.getstate()[0], random.getstate()[2]],
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[-2], tuple(py[:-2]), py[-1]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _model_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """State dict with tied weights stored once (safetensors refuses shared storage)."""
    seen, out = {}, {}
    for name, tensor in model.state_dict().items():
        key = (tensor.data_ptr(), tensor.shape, tensor.dtype)
        if tensor.numel() and key in seen:
            continue
        seen[key] = name
        out[name] = tensor.detach().contiguous().cpu()
    return out


def load_model_weights(model: torch.nn.Module, path: Path) -> None:
    tensors = load_file(str(path))
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    tied = {n for n in missing if n == "lm_head.weight" and model.lm_head is None}
    missing = [n for n in missing if n not in tied]
    if missing or unexpected:
        raise ValueError(f"checkpoint {path}: missing {missing[:5]} unexpected {unexpected[:5]} weights; was it saved "
                         "from a model with a different config?")


class CheckpointManager:
    def __init__(self, run_dir: str | os.PathLike, keep_last: int, rank: int, world_size: int):
        self.root = Path(run_dir) / "checkpoints"
        self.keep_last = keep_last
        self.rank = rank
        self.world_size = world_size

    # ------------------------------------------------------------------ discovery
    def latest(self) -> Path | None:
        pointer = self.root / LATEST
        if not pointer.is_file():
            return None
        path = self.root / pointer.read_text().strip()
        return path if (path / "trainer.json").is_file() else None

    def clean_partial(self) -> None:
        """Remove temp directories left by a run killed while saving (rank 0, before training)."""
        if self.rank == 0 and self.root.is_dir():
            for tmp in self.root.glob(".tmp-step-*"):
                shutil.rmtree(tmp, ignore_errors=True)

    # ------------------------------------------------------------------ save
    def save(self, step: int, model, optimizer, trainer_state: dict, data_state: dict, config_yaml: str,
             barrier, collective_write=None) -> Path:
        """Collective: every rank calls it. Returns the final directory. `collective_write(tmp_dir)`, when given,
        runs on every rank before the files above are written (engines whose state is sharded save it there);
        `model` / `optimizer` may then be None."""
        final = self.root / f"step-{step}"
        tmp = self.root / f".tmp-step-{step}"
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier()
        if collective_write is not None:
            collective_write(tmp)
        torch.save({"rng": rng_state(), "data": data_state}, tmp / f"rank-{self.rank}.pt")
        if self.rank == 0:
            if model is not None and getattr(model, "_lora_cfg", None) is not None:
                from lctrain.train.lora import save_adapter  # LoRA runs store what trains, not the base
                save_adapter(model, tmp, model._lora_base)
            elif model is not None:
                save_file(_model_tensors(model), str(tmp / "model.safetensors"))
            if optimizer is not None:
                torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            (tmp / "config.yaml").write_text(config_yaml)
            (tmp / "trainer.json").write_text(json.dumps({**trainer_state, "world_size": self.world_size},
                                                         indent=1))
        barrier()
        if self.rank == 0:
            for f in (f for f in tmp.rglob("*") if f.is_file()):
                with open(f, "rb") as handle:
                    os.fsync(handle.fileno())
            _fsync_dir(tmp)
            if final.exists():  # a previous save of the same step (e.g. after a resume) is replaced whole
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(self.root)
            atomic_write_text(self.root / LATEST, final.name)
            self._prune()
        barrier()
        return final

    def _prune(self) -> None:
        steps = sorted((int(p.name.split("-")[1]), p) for p in self.root.glob("step-*") if p.name[5:].isdigit())
        for _, path in steps[:-self.keep_last]:
            shutil.rmtree(path, ignore_errors=True)

    # ------------------------------------------------------------------ load
    def load(self, path: Path, model, optimizer, load_engine_state=None,
             any_world_size: bool = False) -> tuple[dict, dict]:
        """Restore model, optimizer and this rank's RNG; return (trainer_state, data_state).
        `load_engine_state(path)` replaces the model/optimizer part for engines that saved their own.
        `any_world_size`: the engine's state reshards (DCP), so another world size may continue the run."""
        trainer = json.loads((path / "trainer.json").read_text())
        if trainer.get("world_size") != self.world_size and not any_world_size:
            from lctrain.config import ConfigError
            raise ConfigError(f"checkpoint {path} was written by {trainer.get('world_size')} processes, this run has "
                             f"{self.world_size}: resume with the same world size (or start a new run with "
                             "checkpoint.init_from for weights only)")
        if load_engine_state is not None:
            load_engine_state(path)
        else:
            if getattr(model, "_lora_cfg", None) is not None:  # a LoRA run saved what trains only
                from lctrain.train.lora import ADAPTER_FILE, load_adapter
                load_adapter(model, path / ADAPTER_FILE)
            else:
                load_model_weights(model, path / "model.safetensors")
            optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu"))
        rank_file = path / f"rank-{self.rank}.pt"
        if trainer.get("world_size") != self.world_size:  # the data position is global; RNG as rank 0 had it
            rank_file = path / "rank-0.pt"
        per_rank = torch.load(rank_file, weights_only=True)
        set_rng_state(per_rank["rng"])
        return trainer, per_rank["data"]


def _weights_in(directory: Path) -> Path:
    """A checkpoint directory's weights: model.safetensors, or adapter.safetensors for a LoRA run."""
    adapter = directory / "adapter.safetensors"
    if not (directory / "model.safetensors").is_file() and (directory / "dcp").is_dir():
        return directory / "dcp"  # a sharded (fsdp) checkpoint: read with lctrain.train.dcp_checkpoint
    return adapter if adapter.is_file() and not (directory / "model.safetensors").is_file() else \
        directory / "model.safetensors"


def resolve_weights(path: str | os.PathLike) -> Path:
    """A run directory, a checkpoints dir, a checkpoint dir or a .safetensors file -> the weights file
    (`adapter.safetensors` for a LoRA run: `load_weights` merges it with its base)."""
    p = Path(path)
    if (p.is_file() and p.suffix == ".safetensors") or (p.name == "dcp" and (p / ".metadata").is_file()):
        return p
    for root in (p / "checkpoints", p):
        pointer = root / LATEST
        if pointer.is_file():
            return _weights_in(root / pointer.read_text().strip())
    if any((p / name).exists() for name in ("model.safetensors", "adapter.safetensors", "dcp")):
        return _weights_in(p)
    raise FileNotFoundError(f"no model weights under {p} (expected a run dir, a checkpoint dir or a .safetensors file)")


def load_weights(model: torch.nn.Module, source: str | os.PathLike, where: str = "checkpoint.init_from") -> None:
    """Weights into `model` from `hf:PATH`, a run/checkpoint directory or a .safetensors file; a LoRA checkpoint
    is merged with its base first. Errors are one-line ConfigErrors prefixed by `where`."""
    from lctrain.config import ConfigError

    source = str(source)
    if source.startswith("hf:"):
        from lctrain.export.hf_import import load_hf_weights
        load_hf_weights(model, source[3:])
        return
    try:
        weights = resolve_weights(source)
    except FileNotFoundError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    if weights.name == "adapter.safetensors":
        from lctrain.train.lora import load_merged
        load_merged(model, weights)
        return
    try:
        if weights.is_dir():
            from lctrain.train.dcp_checkpoint import load_full_weights
            load_full_weights(model, weights)
        else:
            load_model_weights(model, weights)
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None
