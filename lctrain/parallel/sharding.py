"""Split a packed batch along the sequence over the ranks of an SP group.

Layouts (T padded to `T_pad`, `W` = SP size):
    contiguous: W chunks of `c = T_pad / W` tokens; rank r holds chunk r.
    zigzag:     2W chunks of `c = T_pad / (2W)`; rank r holds chunks r and 2W-1-r (balances causal work).
Padding goes at the end, is masked from the loss (labels -100) and forms its own document (positions 0, 1, ...),
so it never mixes with real tokens in any mixer.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import torch

from lctrain.models.context import document_ids
from lctrain.parallel import comm
from lctrain.parallel.groups import SPGroups, single_process_groups

LAYOUTS = ("contiguous", "zigzag")
ATTENTION_MODES = ("allgather", "ulysses", "ring")
IGNORE_INDEX = -100


def chunk_ids_of(sp_rank: int, sp_size: int, layout: str) -> tuple[int, ...]:
    """Global chunk indices held by `sp_rank`, in local order."""
    if layout == "contiguous":
        return (sp_rank,)
    if layout == "zigzag":
        return (sp_rank, 2 * sp_size - 1 - sp_rank)
    raise ValueError(f"sharding: layout must be one of {LAYOUTS}, got {layout!r}")


@dataclass
class SPPlacement:
    """Where this rank's tokens sit in the packed sample (goes into `BatchContext.sp`).

    layout:       "contiguous" or "zigzag".
    groups:       the DP x SP grid (`SPGroups`); communication runs in `groups.sp_group`.
    chunk_size:   tokens per chunk `c`; each rank holds `len(chunk_ids)` chunks, `T_local = c * len(chunk_ids)`.
    chunk_ids:    global chunk indices held here, in local order.
    seq_len:      padded global length `T_pad`; `orig_len` is the length before padding.
    continues:    bool `[B, n_local_chunks]`: the chunk's first token continues a document of the previous chunk
                  in global order (its position id is not 0).
    position_ids: long `[B, T_local]` positions of the local tokens.
    doc_ids:      long `[B, T_pad]` document index of every token of the whole row (identical on all SP ranks;
                  attention masks use it for remote blocks without communication).
    attention_mode: default strategy of `sp_attention` for this batch ("allgather", "ulysses" or "ring").
    row_offsets_cpu: per row, int32 CPU `[N+1]` document offsets of the whole padded row (global indices), built
                  on the host once per batch: which attention blocks to compute is decided from these.
    row_offsets:  the same on the device of the tokens (one host-to-device copy per batch), for the kernels.
    position_ids_cpu: the local positions on the host (for `BatchContext.from_positions(host_positions=...)`).
    doc_ids_cpu:  `doc_ids` on the host: plans that decide what to fetch or compute read these (`host_view`).
    """
    layout: str
    groups: SPGroups
    chunk_size: int
    chunk_ids: tuple[int, ...]
    seq_len: int
    orig_len: int
    continues: torch.Tensor
    position_ids: torch.Tensor
    doc_ids: torch.Tensor = field(repr=False)
    attention_mode: str = "allgather"
    row_offsets_cpu: tuple[torch.Tensor, ...] = field(default=(), repr=False)
    row_offsets: tuple[torch.Tensor, ...] = field(default=(), repr=False)
    position_ids_cpu: torch.Tensor | None = field(default=None, repr=False)
    doc_ids_cpu: torch.Tensor | None = field(default=None, repr=False)

    def host_view(self) -> "SPPlacement":
        """This placement with `doc_ids` on the host: planning code run on it reads no device tensor back."""
        return self if self.doc_ids_cpu is None else replace(self, doc_ids=self.doc_ids_cpu)

    @property
    def sp_rank(self) -> int:
        return self.groups.sp_rank

    @property
    def sp_size(self) -> int:
        return self.groups.sp_size

    @property
    def num_chunks(self) -> int:
        """Chunks in the whole sequence (W or 2W)."""
        return self.seq_len // self.chunk_size

    @property
    def local_len(self) -> int:
        return self.chunk_size * len(self.chunk_ids)

    def chunk_ids_of(self, sp_rank: int) -> tuple[int, ...]:
        return chunk_ids_of(sp_rank, self.sp_size, self.layout)

    def global_index(self, sp_rank: int | None = None) -> torch.Tensor:
        """long `[T_local]`: global token index of each local token of `sp_rank` (default: this rank)."""
        rank = self.sp_rank if sp_rank is None else sp_rank
        c = self.chunk_size
        device = self.doc_ids.device
        return torch.cat([torch.arange(j * c, (j + 1) * c, device=device) for j in self.chunk_ids_of(rank)])

    def local_doc_ids(self, sp_rank: int | None = None) -> torch.Tensor:
        """long `[B, T_local]`: document index of each token held by `sp_rank` (default: this rank)."""
        return self.doc_ids[:, self.global_index(sp_rank)]


def _pad_value(key: str, tensor: torch.Tensor):
    if key == "labels":
        return IGNORE_INDEX
    if tensor.dtype == torch.bool:
        return False
    return 0


def host_row_offsets(positions: torch.Tensor, padded: int) -> tuple[torch.Tensor, ...]:
    """Per row of host positions `[B, T]`: int32 CPU document offsets of the row padded to `padded` tokens (a
    document starts at position 0 and at the row start; the padding is one more document)."""
    rows, length = positions.shape
    starts = (positions == 0).numpy().copy()
    starts[:, 0] = True
    out = []
    for row in starts:
        cuts = np.flatnonzero(row).tolist() + ([length] if padded > length else []) + [padded]
        out.append(torch.tensor(cuts, dtype=torch.int32))
    return tuple(out)


def shard_batch(batch: dict, sp_rank: int, sp_size: int, layout: str = "zigzag",
                groups: SPGroups | None = None, attention_mode: str = "allgather",
                host_positions: torch.Tensor | None = None) -> tuple[dict, SPPlacement]:
    """Pad and split a packed batch; return this rank's tokens and their placement.

    batch: dict with `position_ids [B, T]` (required), usually `input_ids` and `labels [B, T]`; every tensor
           whose first two dims are `[B, T]` is sharded with the tokens, anything else is passed through.
    Returns `(local_batch, placement)` with every sharded tensor `[B, T_local, ...]`.
    groups: the SP grid for the placement's communication; default a single-process grid (sharding only).
    attention_mode: what `sp_attention(..., mode=None)` uses for this batch.
    host_positions: the CPU copy of `position_ids` (the loader's): the host tables are built from it. Without it
           they come from one copy of `position_ids` (a device sync when those live on an accelerator).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"shard_batch: layout must be one of {LAYOUTS}, got {layout!r}")
    if attention_mode not in ATTENTION_MODES:
        raise ValueError(f"shard_batch: attention_mode must be one of {ATTENTION_MODES}, got {attention_mode!r}")
    if not isinstance(sp_size, int) or sp_size < 1 or not isinstance(sp_rank, int) or not 0 <= sp_rank < sp_size:
        raise ValueError(f"shard_batch: need 0 <= sp_rank < sp_size, got sp_rank={sp_rank!r}, sp_size={sp_size!r}")
    if groups is None:
        groups = single_process_groups()
        if sp_size > 1:
            groups = SPGroups(world_size=1, rank=0, sp_size=sp_size, sp_rank=sp_rank, dp_size=1, dp_rank=0)
    elif groups.sp_size != sp_size or groups.sp_rank != sp_rank:
        raise ValueError(f"shard_batch: groups say sp_rank={groups.sp_rank}, sp_size={groups.sp_size} but "
                         f"sp_rank={sp_rank}, sp_size={sp_size} were passed")
    positions = batch.get("position_ids") if isinstance(batch, dict) else None
    if not isinstance(positions, torch.Tensor) or positions.dim() != 2:
        raise ValueError("shard_batch: batch must be a dict holding 'position_ids' as a [B, T] tensor")
    rows, length = positions.shape
    if length == 0:
        raise ValueError("shard_batch: empty sequence (T = 0)")

    num_chunks = sp_size * (2 if layout == "zigzag" else 1)
    padded = -(-length // num_chunks) * num_chunks
    pad = padded - length
    chunk = padded // num_chunks

    def pad_tensor(key: str, t: torch.Tensor) -> torch.Tensor:
        if pad == 0:
            return t
        if key == "position_ids":
            # padding is one extra document: positions 0, 1, ... so it starts fresh and never continues a real one
            tail = torch.arange(pad, device=t.device, dtype=t.dtype).expand(rows, pad)
        else:
            tail = t.new_full((rows, pad) + tuple(t.shape[2:]), _pad_value(key, t))
        return torch.cat([t, tail], dim=1)

    ids = chunk_ids_of(sp_rank, sp_size, layout)
    index = torch.cat([torch.arange(j * chunk, (j + 1) * chunk, device=positions.device) for j in ids])
    local = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor) and value.dim() >= 2 and tuple(value.shape[:2]) == (rows, length):
            local[key] = pad_tensor(key, value).index_select(1, index)
        else:
            local[key] = value
    full_positions = pad_tensor("position_ids", positions)
    local_positions = local["position_ids"]
    chunk_starts = torch.arange(len(ids), device=positions.device) * chunk
    continues = local_positions[:, chunk_starts] != 0
    if host_positions is None or tuple(host_positions.shape) != (rows, length):
        host_positions = positions.detach().cpu()
    host_positions = host_positions.cpu()
    offsets_cpu = host_row_offsets(host_positions, padded)
    host_index = torch.cat([torch.arange(j * chunk, (j + 1) * chunk) for j in ids])
    host_full = torch.cat([host_positions, torch.arange(pad, dtype=host_positions.dtype).expand(rows, pad)], dim=1)
    placement = SPPlacement(layout=layout, groups=groups, chunk_size=chunk, chunk_ids=ids, seq_len=padded,
                            orig_len=length, continues=continues, position_ids=local_positions,
                            doc_ids=document_ids(full_positions), attention_mode=attention_mode,
                            row_offsets_cpu=offsets_cpu,
                            row_offsets=tuple(o.to(positions.device, non_blocking=True) for o in offsets_cpu),
                            position_ids_cpu=host_full.index_select(1, host_index),
                            doc_ids_cpu=document_ids(host_full))
    return local, placement


def gather_sequence(local: torch.Tensor, placement: SPPlacement, trim: bool = True,
                    kind: str = "gather") -> torch.Tensor:
    """Rebuild the whole sequence from every SP rank's `local [B, T_local, ...]` -> `[B, T, ...]` in global order
    (padding removed unless `trim=False`). Collective over the SP group; not differentiable (tests, eval)."""
    if local.dim() < 2 or local.shape[1] != placement.local_len:
        raise ValueError(f"gather_sequence: expected [B, {placement.local_len}, ...], got {tuple(local.shape)}")
    pieces = comm.all_gather(local.detach(), placement.groups, kind)          # [W, B, T_local, ...]
    out = local.new_empty((local.shape[0], placement.seq_len) + tuple(local.shape[2:]))
    for rank in range(placement.sp_size):
        out[:, placement.global_index(rank)] = pieces[rank]
    return out[:, :placement.orig_len] if trim else out


def loss_normalizer(labels_local: torch.Tensor, groups: SPGroups) -> torch.Tensor:
    """Number of target tokens (labels != -100) in the whole DP x SP world, as a 0-dim long tensor.

    Collective over the world: every rank must call it once per step.
    """
    count = (labels_local != IGNORE_INDEX).sum().to(torch.long)
    return comm.all_reduce_world(count, groups, "loss")
