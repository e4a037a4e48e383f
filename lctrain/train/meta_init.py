"""Materialise a meta-built, FSDP-sharded language model one piece at a time.

The model was built with its parameters on `meta` (`lctrain.models.init.parameters_on_meta`) and then sharded, so
each parameter is a DTensor whose local shard has no storage yet. For each piece (one block, the embedding, the
final norm, the LM head) a full-size copy of just that piece is made on the host, initialised by the model's own
`init_module_` (seeded per module, so the values equal an eager build's for the same seed), and each rank keeps
its own slice. At no moment does more than one piece exist in full: a 7B model never exists whole on a device or
on the host.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor, distribute_tensor


def pieces(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(dotted path, module) for every block and every other direct child of the model that has parameters."""
    out = []
    for name, child in model.named_children():
        if name == "layers":
            out += [(f"layers.{i}", block) for i, block in enumerate(child)]
        elif any(True for _ in child.parameters()):
            out.append((name, child))
    return out


def _restore_buffers(model: nn.Module, saved: dict[str, torch.Tensor], device: torch.device) -> None:
    for name, value in saved.items():
        owner, _, leaf = name.rpartition(".")
        module = model.get_submodule(owner) if owner else model
        module._buffers[leaf] = value.to(device)


def place_full(shard: torch.Tensor, full: torch.Tensor, device: torch.device) -> None:
    """Copy this rank's part of the full tensor `full` into the (sharded) parameter `shard`."""
    with torch.no_grad():
        if isinstance(shard, DTensor):  # every rank slices the same full tensor: no communication
            local = distribute_tensor(full.to(device), shard.device_mesh, shard.placements,
                                      src_data_rank=None).to_local()
            shard.to_local().copy_(local)
        else:
            shard.copy_(full)


def materialize(model: nn.Module, blueprint: nn.Module, device: torch.device, fill=None, read_local=None) -> None:
    """Allocate `model`'s shards on `device` and fill them. `blueprint` is an unsharded copy of the model taken
    before sharding (parameters on meta); its pieces are made real on the host one at a time and freed again.
    `fill(path, piece)` fills a full piece (default: the model's own init; `meta_source`: checkpoint weights).
    `read_local(path, piece, full_piece)` may fill the sharded piece directly, each rank reading only its own
    shards (`meta_source.local_reader`); it returns False to leave the piece to `fill`."""
    fill = fill or model.init_module_
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}  # real: computed at construction
    model.to_empty(device=device)
    _restore_buffers(model, buffers, device)
    covered = set()
    for path, piece in pieces(model):
        full_piece = blueprint.get_submodule(path)
        if read_local is not None and read_local(path, piece, full_piece):
            covered.update(f"{path}.{name}" for name, _ in piece.named_parameters())
            continue
        full_piece.to_empty(device="cpu")
        fill(path, full_piece)
        for (name, shard), (full_name, full) in zip(piece.named_parameters(), full_piece.named_parameters()):
            assert name == full_name, (name, full_name)
            place_full(shard, full, device)
            covered.add(f"{path}.{name}")
        full_piece.to("meta")  # free the host copy before the next piece
    left = [n for n, _ in model.named_parameters() if n not in covered]
    if left:
        raise RuntimeError(f"meta initialisation: parameters outside any block or top-level module: {left[:5]}")


def blueprint_of(model: nn.Module) -> nn.Module:
    """An unsharded copy of a meta-built model (costs only its buffers)."""
    if any(not p.is_meta for p in model.parameters()):
        raise ValueError("blueprint_of: the model has real parameters; it was not built on meta")
    return copy.deepcopy(model)
