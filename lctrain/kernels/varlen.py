"""Chunk-aligned layout for packed documents, shared by the chunked PyTorch paths.

Looping over documents one by one costs a batch of small kernel launches per document (a packed 8 x 4K batch of
source files holds dozens). Instead every document is padded to a whole number of chunks and all chunks of all
documents are processed together; only the short inter-chunk recurrence walks the chunks in order, resetting the
state where a document starts. Padding tokens must be neutral for the op (zero k/v, zero log-gate), which the
caller arranges by padding with zeros.
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

    def align(self, x: torch.Tensor) -> torch.Tensor:
        """[1, T, ...] -> [1, num_chunks * C, ...] with zeros in the padding."""
        out = x.new_zeros(1, self.num_chunks * self.chunk_size, *x.shape[2:])
        return out.index_copy(1, self.dest, x)

    def unalign(self, y: torch.Tensor) -> torch.Tensor:
        """[1, num_chunks * C, ...] -> [1, T, ...]."""
        return y.index_select(1, self.dest)


def chunk_layout(cu_seqlens: torch.Tensor, chunk_size: int) -> ChunkLayout:
    bounds = [int(b) for b in cu_seqlens.tolist()]
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
    return ChunkLayout(dest.to(cu_seqlens.device), chunk_offset, chunk_size, chunk_doc, first, last)
