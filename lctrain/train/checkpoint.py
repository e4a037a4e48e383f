"""Atomic, complete checkpoints: `<run.dir>/checkpoints/step-<N>/` plus a `latest` pointer.

Layout of one checkpoint:
    model.safetensors       weights (rank 0)
    optimizer.pt            optimizer state (rank 0; tensors and plain containers only)
    trainer.json            step, tokens seen, scheduler state, skipped steps, world layout
    rank-<r>.pt             per-rank RNG states (python, numpy, torch, cuda) and data-loader state
    config.yaml             the resolved config
    deepspeed/              DeepSpeed engines only: its own model/optimizer (ZeRO partition) files, in place of
                            optimizer.pt; model.safetensors is still written, so export and init_from work alike

    manifest.json           size and SHA-256 of every file above (and below, e.g. deepspeed/), written last

Everything is written into `.tmp-step-<N>-<writer>/` first (the writer: rank 0's host and pid, so two runs never
share a temp dir); once every rank has finished, rank 0 writes the manifest, renames the directory to `step-<N>/`
and only then replaces `latest`. `latest` is a hint: resuming takes the newest checkpoint whose manifest verifies
(checkpoint_select), so a kill, a full disk or a corrupted file at any moment costs at most the newest save.
Loading uses safetensors and `torch.load(weights_only=True)`: no arbitrary pickles.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lctrain.train.rng import rng_state, set_rng_state  # noqa: F401  (re-exported for callers)

from lctrain.config import ConfigError
from lctrain.train.checkpoint_select import (LATEST, CheckpointError, Selection, latest_hint, newest_first, select,
                                             step_dirs, trainer_json_problem, weights_legacy, write_order)
from lctrain.train.errors import CheckpointSaveError
from lctrain.train.manifest import write_manifest


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


def _shape_mismatch(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> str | None:
    """The first parameter whose shape differs, as one phrase (and how many more differ)."""
    expected = model.state_dict()
    differing = [n for n, t in expected.items() if n in tensors and tuple(t.shape) != tuple(tensors[n].shape)]
    if not differing:
        return None
    first = differing[0]
    more = f" (and {len(differing) - 1} more)" if len(differing) > 1 else ""
    return (f"{first} has shape {list(tensors[first].shape)} in the checkpoint but {list(expected[first].shape)} "
            f"in this model{more}")


def load_model_weights(model: torch.nn.Module, path: Path) -> None:
    try:
        tensors = load_file(str(path))
    except FileNotFoundError:
        raise ValueError(f"checkpoint {path}: file not found") from None
    except Exception as exc:  # safetensors raises its own error type for truncated or garbled files
        raise ValueError(f"checkpoint {path}: not a readable safetensors file ({str(exc).splitlines()[0]})") from None
    mismatch = _shape_mismatch(model, tensors)
    if mismatch:
        raise ValueError(f"checkpoint {path}: {mismatch}; was it saved from a model with a different config?")
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    tied = {n for n in missing if n == "lm_head.weight" and model.lm_head is None}
    missing = [n for n in missing if n not in tied]
    if missing or unexpected:
        raise ValueError(f"checkpoint {path}: missing {missing[:5]} unexpected {unexpected[:5]} weights; was it saved "
                         "from a model with a different config?")


def describe_write_error(exc: BaseException, directory: Path) -> str:
    """The cause of a failed write in words. torch.save hides ENOSPC behind `enforce fail ... unexpected pos`,
    so a nearly full file system is named as the cause too."""
    if isinstance(exc, OSError) and exc.errno:
        return os.strerror(exc.errno).lower()
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if "No space left" in text or "os error 28" in text:
        return "no space left on device"
    try:
        free = shutil.disk_usage(directory).free
    except OSError:
        free = None
    if free is not None and free < 64 * 2**20:
        return f"no space left on device ({free} bytes free; {type(exc).__name__}: {text})"
    return f"{type(exc).__name__}: {text}"


def _writer_token(rank: int, world_size: int) -> str:
    """A name for this run's temporary files, the same on every rank (rank 0's host and pid)."""
    token = f"{socket.gethostname()}-{os.getpid()}"
    if world_size > 1:
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            box = [token]
            dist.broadcast_object_list(box, src=0)
            token = box[0]
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in token)


def _all_ranks_ok(ok: bool, world_size: int) -> bool:
    """Every rank learns whether every rank wrote its files (a collective; also the barrier it replaces)."""
    import torch.distributed as dist
    if world_size == 1 or not (dist.is_available() and dist.is_initialized()):
        return ok
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    flag = torch.tensor([1 if ok else 0], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


class CheckpointManager:
    def __init__(self, run_dir: str | os.PathLike, keep_last: int, rank: int, world_size: int,
                 writer: str | None = None):
        self.root = Path(run_dir) / "checkpoints"
        self.keep_last = keep_last
        self.rank = rank
        self.world_size = world_size
        self.writer = writer or _writer_token(rank, world_size)  # collective when distributed and not given
        self.resumed_from: Path | None = None
        self.known_bad: set[str] = set()  # skipped at selection: neither counted as kept nor deleted
        self._generation: int | None = None

    # ------------------------------------------------------------------ discovery
    def select(self) -> Selection:
        """The checkpoint to resume from (rank 0 reads the disk; see checkpoint_select). Raises CheckpointError
        when checkpoints exist and none verifies."""
        chosen = select(self.root)
        self.known_bad = {name for name, _ in chosen.skipped}
        self.resumed_from = chosen.path
        return chosen

    def latest(self) -> Path | None:
        """The newest usable checkpoint, or None when there is none at all."""
        return self.select().path

    def clean_partial(self) -> None:
        """Remove temp directories left by a writer killed while saving (rank 0, with the run-dir lock held)."""
        if self.rank == 0 and self.root.is_dir():
            for tmp in self.root.glob(".tmp-step-*"):
                shutil.rmtree(tmp, ignore_errors=True)

    def _next_generation(self) -> int:
        if self._generation is None:
            found = [write_order(p)[0] for p in step_dirs(self.root)]
            self._generation = max(found, default=0)
        self._generation += 1
        return self._generation

    # ------------------------------------------------------------------ save
    def save(self, step: int, model, optimizer, trainer_state: dict, data_state: dict, config_yaml: str,
             barrier, collective_write=None) -> Path:
        """Collective: every rank calls it. Returns the final directory. `collective_write(tmp_dir)`, when given,
        runs on every rank before the files above are written (engines whose state is sharded save it there);
        `model` / `optimizer` may then be None. On failure every rank raises CheckpointSaveError naming the step,
        the path and the cause; the partial directory is removed and `latest` is left alone."""
        final = self.root / f"step-{step}"
        tmp = self.root / f".tmp-step-{step}-{self.writer}"  # unique per writer: a second run cannot clash
        error: BaseException | None = None
        if self.rank == 0:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
            except OSError as exc:
                error = exc
        barrier()
        try:
            if not tmp.is_dir():
                raise FileNotFoundError(f"{tmp} was not created")
            if collective_write is not None:
                collective_write(tmp)
            torch.save({"rng": rng_state(), "data": data_state}, tmp / f"rank-{self.rank}.pt")
            if self.rank == 0:
                self._write_main(tmp, model, optimizer, trainer_state, config_yaml)
        except Exception as exc:  # noqa: BLE001 - reported below as one line, after every rank agreed
            error = error or exc
        ok = _all_ranks_ok(error is None, self.world_size)
        if ok and self.rank == 0:
            try:
                self._publish(tmp, final, step)
            except Exception as exc:  # noqa: BLE001
                error = exc
        ok = _all_ranks_ok(ok and error is None, self.world_size)
        if not ok:
            self._fail(step, tmp, final, error)
        self.prune(keep=final)
        barrier()
        return final

    def _write_main(self, tmp: Path, model, optimizer, trainer_state: dict, config_yaml: str) -> None:
        if model is not None and getattr(model, "_lora_cfg", None) is not None:
            from lctrain.train.lora import save_adapter  # LoRA runs store what trains, not the base
            save_adapter(model, tmp, model._lora_base)
        elif model is not None:
            save_file(_model_tensors(model), str(tmp / "model.safetensors"))
        if optimizer is not None:
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        (tmp / "config.yaml").write_text(config_yaml)
        (tmp / "trainer.json").write_text(json.dumps({**trainer_state, "world_size": self.world_size}, indent=1))

    def _publish(self, tmp: Path, final: Path, step: int) -> None:
        """Rank 0, once every rank wrote its files: fsync, manifest last, rename, then `latest`."""
        for f in (f for f in tmp.rglob("*") if f.is_file()):
            with open(f, "rb") as handle:
                os.fsync(handle.fileno())
        write_manifest(tmp, step, self._next_generation())
        _fsync_dir(tmp)
        if final.exists():  # a previous save of the same step (e.g. after a resume) is replaced whole
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(self.root)
        atomic_write_text(self.root / LATEST, final.name)
        self.known_bad.discard(final.name)

    def _fail(self, step: int, tmp: Path, final: Path, error: BaseException | None) -> None:
        cause = describe_write_error(error, self.root) if error is not None else "another rank failed to write"
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # partial files; a renamed but unfinished step fails its manifest
        previous = latest_hint(self.root)
        where = f"latest still names {previous}" if previous else "no earlier checkpoint"
        raise CheckpointSaveError(f"saving step {step} to {final} failed on rank {self.rank}: {cause}; {where}") \
            from error

    def prune(self, keep: Path | None = None) -> None:
        """Rank 0: keep the `keep_last` newest saves by order of writing, never `keep` (just written) nor the
        checkpoint this run resumed from; directories skipped as corrupt at resume are left for the user."""
        if self.rank != 0:
            return
        protected = {p.name for p in (keep, self.resumed_from) if p is not None}
        kept = 0
        for path in newest_first(self.root):
            if path.name in self.known_bad:
                continue
            if kept < self.keep_last or path.name in protected:
                kept += 1
                continue
            shutil.rmtree(path, ignore_errors=True)

    # ------------------------------------------------------------------ load
    def load(self, path: Path, model, optimizer, load_engine_state=None,
             any_world_size: bool = False) -> tuple[dict, dict]:
        """Restore model, optimizer and this rank's RNG; return (trainer_state, data_state).
        `load_engine_state(path)` replaces the model/optimizer part for engines that saved their own.
        `any_world_size`: the engine's state reshards (DCP), so another world size may continue the run."""
        problem = trainer_json_problem(path)
        if problem:
            raise CheckpointError(f"checkpoint {path}: {problem}")
        trainer = json.loads((path / "trainer.json").read_text())
        if trainer.get("world_size") != self.world_size and not any_world_size:
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
                try:
                    load_model_weights(model, path / "model.safetensors")
                except ValueError as exc:
                    raise CheckpointError(str(exc)) from None
            optimizer.load_state_dict(_torch_load(path / "optimizer.pt"))
        resized = trainer.get("world_size") != self.world_size  # the data position is global; RNG as rank 0 had it
        per_rank = _torch_load(path / f"rank-{0 if resized else self.rank}.pt")
        set_rng_state(per_rank["rng"])
        if resized:
            return trainer, every_rank_streams(path, per_rank["data"], trainer.get("world_size"))
        return trainer, per_rank["data"]


def every_rank_streams(path: Path, data_state, saved_world: int | None):
    """A streaming loader's state plus the stream states every rank saved (`all_ranks`): on another world size a
    rank goes on with streams that other ranks were reading. Other loader states are global: returned as they are."""
    if not (isinstance(data_state, dict) and data_state.get("batching") == "streaming"):
        return data_state
    files = [path / f"rank-{r}.pt" for r in range(saved_world or 1)]
    return dict(data_state, all_ranks=[_torch_load(f)["data"] for f in files if f.is_file()])


def _torch_load(path: Path):
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path.parent}: {path.name} is missing") from None
    except Exception as exc:  # noqa: BLE001 - a truncated zip or pickle: one line naming the file
        raise CheckpointError(f"checkpoint {path.parent}: {path.name} is not readable "
                              f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None


def _weights_in(directory: Path) -> Path:
    """A checkpoint directory's weights: model.safetensors, or adapter.safetensors for a LoRA run."""
    adapter = directory / "adapter.safetensors"
    if not (directory / "model.safetensors").is_file() and (directory / "dcp").is_dir():
        return directory / "dcp"  # a sharded (fsdp) checkpoint: read with lctrain.train.dcp_checkpoint
    return adapter if adapter.is_file() and not (directory / "model.safetensors").is_file() else \
        directory / "model.safetensors"


_SAID: set[str] = set()


def resolve_weights(path: str | os.PathLike) -> Path:
    """A run directory, a checkpoints dir, a checkpoint dir or a .safetensors file -> the weights file
    (`adapter.safetensors` for a LoRA run: `load_weights` merges it with its base). For a run or checkpoints dir
    this is the newest checkpoint that verifies, as for resuming; passing over newer ones is said on stderr."""
    p = Path(path)
    if (p.is_file() and p.suffix == ".safetensors") or (p.name == "dcp" and (p / ".metadata").is_file()):
        return p
    for root in (p / "checkpoints", p):
        if step_dirs(root) or (root / LATEST).exists():
            chosen = select(root, legacy_ok=weights_legacy)
            for name, why in chosen.skipped:  # a fallback is said once per process, however often it is resolved
                line = f"note: checkpoint {root / name} skipped: {why}; using {chosen.path.name}"
                if line not in _SAID:
                    _SAID.add(line)
                    print(line, file=sys.stderr, flush=True)
            return _weights_in(chosen.path)
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
    except CheckpointError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    except FileNotFoundError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    if weights.name == "adapter.safetensors" or (weights.is_dir() and (weights.parent / "adapter.json").is_file()):
        load_merged(model, weights)  # a LoRA run's adapters (a sharded dcp/ one under fsdp) on their base
        return
    try:
        if weights.is_dir():
            from lctrain.train.dcp_checkpoint import load_full_weights
            load_full_weights(model, weights)
        else:
            load_model_weights(model, weights)
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def load_merged(model: torch.nn.Module, adapter: Path) -> torch.nn.Module:
    """Base weights named by adapter.json, then the adapters (adapter.safetensors, or a sharded checkpoint's
    dcp/), merged: a plain model equal to the adapter model."""
    from lctrain.config import LoraConfig
    from lctrain.train.lora import ADAPTER_META, apply_lora, load_adapter, merge_lora, read_meta

    meta = read_meta(adapter)
    load_weights(model, meta["base"], where=f"{adapter.parent / ADAPTER_META}: base")
    settings = LoraConfig(enabled=True, r=int(meta["r"]), alpha=float(meta["alpha"]),
                          dropout=float(meta["dropout"]), target_modules=list(meta["target_modules"]),
                          trainable=list(meta["trainable"]))
    apply_lora(model, settings)
    load_adapter(model, adapter)
    return merge_lora(model)


def describe_base(source: str) -> str:
    """The base as stored in adapter.json: `hf:` paths and run paths made absolute, so a checkpoint still finds
    its base when read from another working directory."""
    if source.startswith("hf:"):
        return "hf:" + os.path.abspath(source[3:])
    try:
        return str(resolve_weights(source).resolve())
    except FileNotFoundError:
        return os.path.abspath(source)
