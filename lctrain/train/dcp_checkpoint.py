"""Sharded checkpoints with torch.distributed.checkpoint (DCP), in lctrain's checkpoint layout.

A sharded checkpoint is an ordinary `step-<N>/` directory (trainer.json, rank-<r>.pt, config.yaml, written by
`CheckpointManager`) whose weights and optimizer state live in `step-<N>/dcp/`: every rank writes its own shards
(`__<rank>_0.distcp`) and rank 0 the `.metadata` that says where each slice of each tensor is. DCP reshards on
load, so a checkpoint written by W processes continues on any other number of processes, and a single process
with no process group reads the full tensors (`lctrain.load_model`, `export`, `eval`, `init_from`).

Asynchronous saves (`checkpoint.async_save`): the state is copied to host memory, the step goes on while a
background thread writes the shards into `.tmp-step-<N>-shards/`, and only once every rank has finished are they
moved into the checkpoint, which `CheckpointManager.save` then completes (temp dir, manifest, rename, `latest`) as a
synchronous save would. A kill at any moment therefore leaves `latest` on a complete checkpoint. A save waits for
the previous one first, and the run waits for the last one before it ends.
"""
from __future__ import annotations

import copy
import os
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from lctrain.train.rng import rng_state, set_rng_state

DCP_DIR = "dcp"  # inside step-<N>/
MODEL_KEY, OPTIMIZER_KEY = "model", "optimizer"


def is_sharded_checkpoint(directory: Path) -> bool:
    return (Path(directory) / DCP_DIR / ".metadata").is_file()


def _options(model: torch.nn.Module) -> StateDictOptions:
    """A LoRA run stores what trains (adapters, embeddings, norms), as under ddp: the frozen base is the run's
    `checkpoint.init_from`, named in adapter.json."""
    lora = getattr(model, "_lora_cfg", None) is not None
    return StateDictOptions(ignore_frozen_params=lora, strict=not lora)


def training_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Model and optimizer state keyed by parameter name (not by index), sharded as the model is."""
    model_state, optimizer_state = get_state_dict(model, optimizer, options=_options(model))
    return {MODEL_KEY: model_state, OPTIMIZER_KEY: optimizer_state}


def load_training_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, directory: Path) -> None:
    """Collective: read a sharded checkpoint into this run's shards, whatever world size wrote it."""
    state = training_state(model, optimizer)
    dcp.load(state, checkpoint_id=str(directory))
    set_state_dict(model, optimizer, model_state_dict=state[MODEL_KEY], optim_state_dict=state[OPTIMIZER_KEY],
                   options=_options(model))


def load_full_weights(model: torch.nn.Module, directory: Path, names=None) -> None:
    """Full weights of a sharded checkpoint (`step-<N>/dcp`) into a plain, unsharded model, in this process alone
    (no process group needed, none used if one exists). `names`: only these tensors (a LoRA checkpoint's)."""
    state = {MODEL_KEY: {k: v for k, v in model.state_dict().items() if names is None or k in names}}
    try:
        with warnings.catch_warnings():  # DCP warns that it reads in one process: that is the point here
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(state, checkpoint_id=str(directory), no_dist=True)
    except Exception as exc:  # DCP reports a missing key or a shape mismatch as a generic CheckpointException
        raise ValueError(f"checkpoint {directory}: its weights do not fit this model ({str(exc).splitlines()[0]}); "
                         "was it saved from a model with a different config?") from None
    model.load_state_dict(state[MODEL_KEY], strict=names is None)


class ShardedSaver:
    """Writes sharded checkpoints through `CheckpointManager.save`, synchronously or in the background."""

    def __init__(self, asynchronous: bool, is_main: bool):
        self.asynchronous = asynchronous
        self.is_main = is_main
        self.pending = None
        # A background save talks over its own process group, so its collectives never interleave with training's.
        self.group = dist.new_group(backend="gloo") if asynchronous else None

    def save(self, ckpt, step: int, model, optimizer, trainer_state: dict, data_state: dict, config_yaml: str,
             barrier, main_files=None) -> Path:
        """`main_files(tmp_dir)`: rank 0 writes files beside the shards (a LoRA run's adapter.json)."""
        self.finish()  # one save in flight at a time: the next waits for the previous
        state = training_state(model, optimizer)
        if not self.asynchronous:
            def write(tmp: Path) -> None:
                dcp.save(state, checkpoint_id=str(tmp / DCP_DIR))
                if self.is_main and main_files is not None:
                    main_files(tmp)

            return ckpt.save(step, None, None, trainer_state, data_state, config_yaml, barrier,
                             collective_write=write)
        staging = ckpt.root / f".tmp-step-{step}-shards"
        if self.is_main:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        barrier()
        future = dcp.async_save(state, checkpoint_id=str(staging), process_group=self.group)
        # What the checkpoint records besides the shards is taken now, not when the write completes.
        self.pending = dict(future=future, staging=staging, ckpt=ckpt, step=step, barrier=barrier,
                            trainer_state=copy.deepcopy(trainer_state), data_state=copy.deepcopy(data_state),
                            config_yaml=config_yaml, rng=rng_state(), main_files=main_files)
        return ckpt.root / f"step-{step}"

    def finish(self) -> Path | None:
        """Wait for the save in flight (if any) and complete its checkpoint. Collective."""
        if self.pending is None:
            return None
        job, self.pending = self.pending, None
        job["future"].result()
        staging = job["staging"]

        def move_shards(tmp: Path) -> None:
            if self.is_main:
                os.replace(staging, tmp / DCP_DIR)
                if job["main_files"] is not None:
                    job["main_files"](tmp)

        now = rng_state()
        set_rng_state(job["rng"])  # the checkpoint's per-rank RNG is the one of the step it was taken at
        try:
            return job["ckpt"].save(job["step"], None, None, job["trainer_state"], job["data_state"],
                                    job["config_yaml"], job["barrier"], collective_write=move_shards)
        finally:
            set_rng_state(now)
