"""Resuming a full-state (ddp engine) checkpoint on a different number of processes.

What a ddp checkpoint holds is independent of the world size: the whole model, the whole optimizer state, the
trainer counters, and the data loader's *global* position (every rank saves the same one). So a run saved by N
processes continues on M: every rank loads the model and optimizer, the loader state is read from rank 0's file
(the group then takes the remaining windows its own way, see `lctrain.data.loader`; a streaming loader also gets
every rank's stream states, see `lctrain.data.streaming`), and a rank that had its own
file gets its RNG state back (the others keep the run's seeded state). Engines whose state is sharded by rank
(deepspeed) are refused with one line.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from lctrain.config import ConfigError


def saved_world_size(path: Path) -> int | None:
    try:
        return int(json.loads((Path(path) / "trainer.json").read_text())["world_size"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def load_resized(path: Path, engine, rank: int, world_size: int) -> tuple[dict, dict]:
    """(trainer_state, data_state) of checkpoint `path` written by another world size, restored into `engine`."""
    from lctrain.train.checkpoint import every_rank_streams, load_model_weights
    from lctrain.train.rng import set_rng_state

    path = Path(path)
    saved = saved_world_size(path)
    if getattr(engine, "name", "") != "ddp" or not (path / "optimizer.pt").is_file():
        raise ConfigError(f"checkpoint {path} was written by {saved} processes, this run has {world_size}: the "
                          f"{getattr(engine, 'name', 'engine')} engine's state is sharded by rank; resume with the "
                          "same world size (or start a new run with checkpoint.init_from for weights only)")
    trainer = json.loads((path / "trainer.json").read_text())
    model = engine.module
    if getattr(model, "_lora_cfg", None) is not None:  # a LoRA run saved what trains only
        from lctrain.train.lora import ADAPTER_FILE, load_adapter
        load_adapter(model, path / ADAPTER_FILE)
    else:
        load_model_weights(model, path / "model.safetensors")
    engine.optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu"))
    own = path / f"rank-{rank}.pt"
    if own.is_file():
        set_rng_state(torch.load(own, weights_only=True)["rng"])
    data_state = torch.load(path / "rank-0.pt", weights_only=True)["data"]  # the same global position on all
    return trainer, every_rank_streams(path, data_state, saved)
