"""Document boundaries of one batch, computed once on the host.

The loader knows every boundary (position 0 starts a document). Kernels need some of them as *host* values: how
many documents there are, the longest one, which chunks belong to which document, whether every row is a single
document (then the batched, non-varlen path applies). Reading those from device tensors inside a forward costs a
device-to-host sync per layer and breaks `torch.compile` graphs, so they are computed here, once per batch, from
the CPU copy of `position_ids`, and travel in `BatchContext.docs`.

Kernel ops take the host offsets as a CPU int32 tensor (`cu_seqlens_cpu`): a tensor argument keeps a compiled
graph free of value guards (no recompilation when the boundaries change), and the op's own implementation, opaque
to the compiler, reads it without touching the device.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch


def host_cu_seqlens(position_ids: np.ndarray) -> np.ndarray:
    """`[B, T]` positions (host) -> int64 `[N+1]` offsets over the flattened `B*T` tokens: a document starts
    wherever the position is 0 and at the start of every row."""
    batch, seqlen = position_ids.shape
    starts = position_ids == 0
    starts[:, 0] = True
    flat_starts = np.flatnonzero(starts.reshape(-1))
    return np.concatenate([flat_starts, [batch * seqlen]]).astype(np.int64)


@dataclass(frozen=True)
class Documents:
    """Host-side document layout of a `[B, T]` batch (T = this rank's tokens under sequence parallelism).

    cu_seqlens_cpu: int32 `[N+1]` CPU tensor, offsets over the flattened `B*T` tokens (every row starts a document).
    batch, seqlen:  B and T.
    """
    cu_seqlens_cpu: torch.Tensor
    batch: int
    seqlen: int

    @classmethod
    def from_positions(cls, position_ids: torch.Tensor | np.ndarray) -> "Documents":
        """From `[B, T]` positions. A device tensor is copied to the host once (eval and tests); the training
        loop passes the loader's CPU tensor, so building this costs no device sync."""
        if isinstance(position_ids, torch.Tensor):
            position_ids = position_ids.detach().cpu().numpy()
        if position_ids.ndim != 2:
            raise ValueError(f"Documents: position_ids must be [B, T], got shape {tuple(position_ids.shape)}")
        cu = host_cu_seqlens(np.asarray(position_ids))
        batch, seqlen = position_ids.shape
        return cls(torch.from_numpy(cu.astype(np.int32)), batch, seqlen)

    @cached_property
    def offsets(self) -> tuple[int, ...]:
        """The offsets as Python ints."""
        return tuple(self.cu_seqlens_cpu.tolist())

    @cached_property
    def lengths(self) -> tuple[int, ...]:
        """Every document's length, in order over the flattened batch."""
        o = self.offsets
        return tuple(b - a for a, b in zip(o[:-1], o[1:]))

    @property
    def num_docs(self) -> int:
        return len(self.offsets) - 1

    @cached_property
    def max_len(self) -> int:
        return max(self.lengths) if self.lengths else 0

    @property
    def single_doc_rows(self) -> bool:
        """Every row is one document: ops can take the batched `[B, T]` path instead of the packed one."""
        return self.num_docs == self.batch

    def cu_seqlens(self, device: torch.device | str) -> torch.Tensor:
        """The offsets as an int32 tensor on `device` (one host-to-device copy)."""
        return self.cu_seqlens_cpu.to(device, non_blocking=True)

    def document_ids(self, device: torch.device | str) -> torch.Tensor:
        """Long `[B, T]` on `device`: each token's document index within its row, from 0."""
        starts = np.zeros(self.batch * self.seqlen, dtype=np.int64)
        starts[np.asarray(self.offsets[:-1])] = 1
        ids = np.cumsum(starts.reshape(self.batch, self.seqlen), axis=1) - 1
        return torch.from_numpy(ids).to(device, non_blocking=True)
