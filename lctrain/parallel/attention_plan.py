"""Which attention blocks an SP rank computes, decided once per batch on the host.

A block is one row's (query chunk, key chunk) pair: queries of a chunk held by one SP rank against keys of a chunk
held by another (or the same), computed by the attention op's block form with global offsets. A block is
skipped when no query of it can see a key of it (keys after every query, or no shared document), which is read
from the placement's host document offsets, never from device tensors.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from lctrain.kernels.attention import attention_backward, attention_forward
from lctrain.kernels.attention.pattern import Pattern
from lctrain.parallel.sharding import SPPlacement


@dataclass(frozen=True)
class Block:
    """row; q_piece / k_piece: local chunk index within the query / key rank; q_offset / k_offset: global index
    of the first query / key."""
    row: int
    q_piece: int
    k_piece: int
    q_offset: int
    k_offset: int


class BlockPlan:
    """Visible blocks between the chunks of any two SP ranks, from `placement.row_offsets_cpu`."""

    def __init__(self, placement: SPPlacement, scale: float, backend: str | None):
        if not placement.row_offsets_cpu:
            raise ValueError("sp attention: the placement carries no host document offsets (build it with "
                             "lctrain.parallel.shard_batch)")
        self.placement, self.scale, self.backend = placement, scale, backend
        self.chunk = placement.chunk_size
        self._rows = [Pattern(True, (), (), scale, offsets=tuple(o.tolist())) for o in placement.row_offsets_cpu]
        self.blocks = lru_cache(maxsize=None)(self._blocks)

    def _blocks(self, q_rank: int, k_rank: int) -> tuple[Block, ...]:
        c, out = self.chunk, []
        q_chunks, k_chunks = self.placement.chunk_ids_of(q_rank), self.placement.chunk_ids_of(k_rank)
        for row, pattern in enumerate(self._rows):
            for i, qc in enumerate(q_chunks):
                for j, kc in enumerate(k_chunks):
                    if pattern.key_ranges(qc * c, (qc + 1) * c, kc * c, (kc + 1) * c):
                        out.append(Block(row, i, j, qc * c, kc * c))
        return tuple(out)

    def _kwargs(self, block: Block) -> dict:
        row = block.row
        return dict(cu_seqlens=self.placement.row_offsets[row], cu_seqlens_cpu=self.placement.row_offsets_cpu[row],
                    scale=self.scale, q_offset=block.q_offset, k_offset=block.k_offset, backend=self.backend)

    def _q(self, x: torch.Tensor, block: Block) -> torch.Tensor:
        return x[block.row:block.row + 1, block.q_piece * self.chunk:(block.q_piece + 1) * self.chunk]

    def _k(self, x: torch.Tensor, block: Block) -> torch.Tensor:
        return x[block.row:block.row + 1, block.k_piece * self.chunk:(block.k_piece + 1) * self.chunk]

    def forward(self, q, k, v, q_rank: int, k_rank: int, partials: dict) -> None:
        """Attend q (of `q_rank`, `[B, T_local, H, D]`) to k, v (of `k_rank`); merge into `partials`
        {(row, q_piece): (o, lse)} (float32 accumulation)."""
        from lctrain.kernels.attention import merge_partials
        for block in self.blocks(q_rank, k_rank):
            o, lse = attention_forward(self._q(q, block), self._k(k, block), self._k(v, block), **self._kwargs(block))
            key = (block.row, block.q_piece)
            partials[key] = merge_partials(*partials.get(key, (None, None)), o, lse)

    def assemble(self, partials: dict, q: torch.Tensor, value_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        """partials -> (o `[B, T_local, H, Dv]` in q's dtype, lse `[B, H, T_local]` float32 / float64)."""
        batch, local_len, heads = q.shape[:3]
        dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        o = q.new_zeros(batch, local_len, heads, value_dim)
        lse = torch.full((batch, heads, local_len), float("-inf"), dtype=dtype, device=q.device)
        c = self.chunk
        for (row, piece), (o_p, lse_p) in partials.items():
            o[row:row + 1, piece * c:(piece + 1) * c] = o_p.to(o.dtype)
            lse[row:row + 1, :, piece * c:(piece + 1) * c] = lse_p
        return o, lse

    def backward(self, q, k, v, o, lse, grad_o, q_rank: int, k_rank: int, dq, dk, dv) -> None:
        """Add the blocks' shares of the gradient (given the merged o, lse of q's rank) into dq (q's rank) and dk,
        dv (k's rank), all in the compute dtype."""
        c = self.chunk
        for block in self.blocks(q_rank, k_rank):
            lse_q = lse[block.row:block.row + 1, :, block.q_piece * c:(block.q_piece + 1) * c]
            gq, gk, gv = attention_backward(self._q(q, block), self._k(k, block), self._k(v, block),
                                            self._q(o, block), lse_q, self._q(grad_o, block), **self._kwargs(block))
            self._q(dq, block).add_(gq)
            self._k(dk, block).add_(gk)
            self._k(dv, block).add_(gv)
