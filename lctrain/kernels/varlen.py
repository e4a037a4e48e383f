"""Chunk-aligned layout for packed documents, shared by the chunked PyTorch paths.

Looping over documents one by one costs a batch of small kernel launches per document (a packed 8 x 4K batch of
source files holds dozens). Instead every document is padded to a whole number of chunks and all chunks of all
documents are processed together; only the short inter-chunk recurrence walks the chunks in order, resetting the
state where a document starts. Padding tokens must be neutral for the op (zero k/v, zero log-gate), which the
caller arranges by padding with zeros.

For that walk the chunks are laid out as a `[documents, longest document's chunks]` grid (`ChunkLayout.to_grid`):
all documents step together, so the walk takes as many steps as the longest document has chunks, not as many as
the batch has, and each step is one matmul over every document and head. Grid cells past a document's end hold a
neutral chunk (zero update, unit decay), so the state a row ends with is its document's final state.

Boundaries come from the host (`cu_seqlens_cpu`); a device `cu_seqlens` alone is copied to the host once (a sync).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ChunkLayout:
    """Where each token of a packed `[1, T]` stream goes in the chunk-aligned `[1, num_chunks * C]` stream."""
    dest: torch.Tensor  # [T] long, position of token t in the aligned stream
    num_chunks: int
    chunk_size: int
    chunk_doc: list[int]  # document index of each chunk
    doc_first_chunk: list[int]  # first chunk of each document (== next document's for empty ones)
    doc_last_chunk: list[int]  # last chunk of each document, -1 for an empty document
    grid_index: torch.Tensor  # [num_docs * grid_chunks] long: compact chunk of each grid cell, num_chunks = neutral
    grid_real: torch.Tensor  # [num_chunks] long: grid cell of each compact chunk
    grid_chunks: int  # chunks of the longest document

    @property
    def num_docs(self) -> int:
        return len(self.doc_first_chunk)

    def align(self, x: torch.Tensor) -> torch.Tensor:
        """[1, T, ...] -> [1, num_chunks * C, ...] with zeros in the padding."""
        out = x.new_zeros(1, self.num_chunks * self.chunk_size, *x.shape[2:])
        return out.index_copy(1, self.dest, x)

    def unalign(self, y: torch.Tensor) -> torch.Tensor:
        """[1, num_chunks * C, ...] -> [1, T, ...]."""
        return y.index_select(1, self.dest)

    def to_grid(self, x: torch.Tensor, neutral: float = 0.0, dim: int = 0) -> torch.Tensor:
        """Per-chunk tensor `[..., num_chunks, ...]` (chunk axis `dim`) -> `[..., num_docs, grid_chunks, ...]`,
        with `neutral` in the cells past each document's end."""
        dim = dim % x.dim()
        pad_shape = list(x.shape)
        pad_shape[dim] = 1
        x = torch.cat([x, x.new_full(pad_shape, neutral)], dim=dim)
        out = x.index_select(dim, self.grid_index)
        return out.view(*x.shape[:dim], self.num_docs, self.grid_chunks, *x.shape[dim + 1:])

    def from_grid(self, x: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """Inverse of `to_grid` for the real chunks: `[..., num_docs, grid_chunks, ...]` (document axis `dim`) ->
        `[..., num_chunks, ...]`."""
        dim = dim % x.dim()
        return x.flatten(dim, dim + 1).index_select(dim, self.grid_real)


def chunk_layout(cu_seqlens: torch.Tensor, chunk_size: int, cu_seqlens_cpu: torch.Tensor | None = None) -> ChunkLayout:
    """Layout of the documents `cu_seqlens` (device) / `cu_seqlens_cpu` (the same offsets on the host, preferred:
    without it the device offsets are copied to the host once)."""
    host = cu_seqlens_cpu if cu_seqlens_cpu is not None else cu_seqlens.cpu()
    bounds = [int(b) for b in host.tolist()]
    lengths = [b - a for a, b in zip(bounds, bounds[1:])]
    chunks_per_doc = [-(-n // chunk_size) for n in lengths]
    dest_parts, chunk_doc, first, last = [], [], [], []
    chunk_offset = 0
    for doc, (start, n, nc) in enumerate(zip(bounds, lengths, chunks_per_doc)):
        first.append(chunk_offset)
        last.append(chunk_offset + nc - 1 if nc else -1)
        dest_parts.append(torch.arange(n) + chunk_offset * chunk_size)
        chunk_doc.extend([doc] * nc)
        chunk_offset += nc
    dest = torch.cat(dest_parts) if dest_parts else torch.zeros(0, dtype=torch.long)
    grid_chunks = max(chunks_per_doc, default=0)
    grid_index = torch.full((len(lengths), grid_chunks), chunk_offset, dtype=torch.long)
    grid_real = []
    for doc, nc in enumerate(chunks_per_doc):
        grid_index[doc, :nc] = torch.arange(first[doc], first[doc] + nc)
        grid_real.extend(range(doc * grid_chunks, doc * grid_chunks + nc))
    device = cu_seqlens.device
    return ChunkLayout(dest.to(device), chunk_offset, chunk_size, chunk_doc, first, last,
                       grid_index.flatten().to(device), torch.tensor(grid_real, dtype=torch.long).to(device),
                       grid_chunks)
