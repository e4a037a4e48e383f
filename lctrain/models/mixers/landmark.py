"""`landmark`: RoPE attention through landmark tokens (Mohtashami & Jaggi, 2023).

Training: the data pipeline inserts a landmark token after every `block_size - 1` tokens of each document
(`lctrain.data.landmarks`), and attention is `lctrain.kernels.landmark_attention`: a query attends its own block
directly and each earlier block through a gate given by that block's landmark key.

Decoding (`ctx.cache`): all keys and values are kept in the cache, but each query reads only its own block and
the `retrieve_top_k` earlier blocks (per head) whose landmark keys score highest; the gate softmax runs over the
own block and those landmarks. The working set per query is `(retrieve_top_k + 1) * block_size` keys, whatever
the context length (the cached blocks themselves could live in slower memory). `retrieve_top_k = 0` reads every
block and reproduces the training-time output exactly.
"""
from __future__ import annotations


import torch
import torch.nn as nn
import torch.nn.functional as F

from lctrain.config import ConfigError
from lctrain.kernels import landmark_attention
from lctrain.models.context import BatchContext
from lctrain.models.mixers.qkv import add_qkv, rotated_qkv
from lctrain.models.mixers.registry import register_mixer


def retrieval_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, start: int, block_size: int,
                        top_k: int, scale: float) -> torch.Tensor:
    """Landmark attention for queries at positions `start .. start + n - 1` of one sequence per row, reading
    the top-k earlier blocks per head.

    q `[B, n, H, D]`; keys `[B, start + n, H, D]`, values `[B, start + n, H, V]` (every token so far).
    top_k: earlier blocks each query reads (0 = all). Returns o `[B, n, H, V]`.
    """
    batch, count, heads, _ = q.shape
    total = keys.shape[1]
    pad = -total % block_size
    key_blocks = F.pad(keys, (0, 0, 0, 0, 0, pad)).unflatten(1, (-1, block_size))  # [B, nb, L, H, D]
    value_blocks = F.pad(values, (0, 0, 0, 0, 0, pad)).unflatten(1, (-1, block_size))
    landmark_keys = key_blocks[:, :, -1]  # [B, nb, H, D]; the last block's is only read once it is complete
    positions = torch.arange(start, start + count, device=q.device)
    own_block = positions // block_size  # [n]
    local = torch.arange(block_size, device=q.device)
    own_visible = (local[None, :] <= (positions % block_size)[:, None]) & (local[None, :] != block_size - 1)

    queries = q * scale
    own_keys = key_blocks[:, own_block]  # [B, n, L, H, D]
    own = torch.einsum("bnhd,bnlhd->bnhl", queries, own_keys)
    own = own.masked_fill(~own_visible[None, :, None, :], float("-inf"))
    landmark_scores = torch.einsum("bnhd,bchd->bnhc", queries, landmark_keys)  # [B, n, H, nb]
    earlier = torch.arange(key_blocks.shape[1], device=q.device)[None, :] < own_block[:, None]  # [n, nb]
    landmark_scores = landmark_scores.masked_fill(~earlier[None, :, None, :], float("-inf"))
    read = landmark_scores.shape[-1] if top_k <= 0 else min(top_k, landmark_scores.shape[-1])
    gate_scores, chosen = landmark_scores.topk(read, dim=-1)  # unavailable blocks come back as -inf
    group = torch.softmax(torch.cat([own, gate_scores], dim=-1), dim=-1)
    out = torch.einsum("bnhl,bnlhv->bnhv", group[..., :block_size], value_blocks[:, own_block])
    if read:
        gates = group[..., block_size:]  # [B, n, H, k]
        batch_index = torch.arange(batch, device=q.device)[:, None, None, None]
        head_index = torch.arange(heads, device=q.device)[None, None, :, None]
        member_keys = key_blocks[:, :, :-1][batch_index, chosen, :, head_index]  # [B, n, H, k, L-1, D]
        member_values = value_blocks[:, :, :-1][batch_index, chosen, :, head_index]
        inner = torch.einsum("bnhd,bnhkld->bnhkl", queries, member_keys).softmax(dim=-1)
        out = out + torch.einsum("bnhkl,bnhklv->bnhv", inner * gates.unsqueeze(-1), member_values)
    return out.to(q.dtype)


@register_mixer("landmark", "M")
class LandmarkAttention(nn.Module):
    """Causal multi-head attention through landmark tokens, x `[B, T, D]` -> `[B, T, D]`.

    Options (`model.mixers.landmark`): block_size (tokens per block including its landmark; the data pipeline
    uses the same value), retrieve_top_k (blocks read per query when decoding; 0 = all), rope_theta, backend
    (for `landmark_attention`). Keys and values have `n_kv_heads` heads and are shared by query-head groups.
    """

    def __init__(self, model_cfg, layer_idx: int, block_size: int = 64, retrieve_top_k: int = 0,
                 rope_theta: float | None = None, backend: str | None = None):
        super().__init__()
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 2:
            raise ConfigError(f"model.mixers.landmark.block_size: expected an integer >= 2, got {block_size!r}")
        if isinstance(retrieve_top_k, bool) or not isinstance(retrieve_top_k, int) or retrieve_top_k < 0:
            raise ConfigError(f"model.mixers.landmark.retrieve_top_k: expected an integer >= 0 (0 = every block), "
                              f"got {retrieve_top_k!r}")
        self.layer_idx = layer_idx
        self.block_size = block_size
        self.retrieve_top_k = retrieve_top_k
        self.backend = backend
        add_qkv(self, model_cfg, rope_theta)

    def forward(self, x: torch.Tensor, ctx: BatchContext) -> torch.Tensor:
        batch, seqlen, _ = x.shape
        q, k, v = rotated_qkv(self, x, ctx)
        groups = self.n_heads // self.n_kv_heads
        k, v = k.repeat_interleave(groups, dim=2), v.repeat_interleave(groups, dim=2)
        if ctx.cache is not None:
            o = self._attend_cached(q, k, v, ctx.cache)
        elif ctx.sp is not None:
            from lctrain.parallel import sp_landmark_attention
            # every group-th head is an original kv head: gather GQA-sized keys and values
            o = sp_landmark_attention(q, k[:, :, ::groups], v[:, :, ::groups], self.block_size, self.scale, ctx.sp)
        elif ctx.cu_seqlens is None:
            o = landmark_attention(q, k, v, self.block_size, self.scale, backend=self.backend)
        else:
            flat = [t.reshape(1, batch * seqlen, *t.shape[2:]) for t in (q, k, v)]
            host = None if ctx.docs is None else ctx.docs.cu_seqlens_cpu
            o = landmark_attention(*flat, self.block_size, self.scale, backend=self.backend, cu_seqlens=ctx.cu_seqlens,
                                   cu_seqlens_cpu=host).view(batch, seqlen, self.n_heads, self.head_dim)
        return self.o_proj(o.reshape(batch, seqlen, -1))

    def _attend_cached(self, q, k, v, cache: dict) -> torch.Tensor:
        """Incremental decoding (one document per row, starting at position 0): append k/v, then read the own
        block and the retrieved blocks. Long prefills run one block of queries at a time."""
        entry = cache.setdefault(self.layer_idx, {})
        start = entry["k"].shape[1] if "k" in entry else 0
        if "k" in entry:
            k = torch.cat([entry["k"], k], dim=1)
            v = torch.cat([entry["v"], v], dim=1)
        entry["k"], entry["v"] = k, v
        pieces = []
        for offset in range(0, q.shape[1], self.block_size):
            end = min(q.shape[1], offset + self.block_size)
            known = start + end  # keys up to the last query of this piece
            pieces.append(retrieval_attention(q[:, offset:end], k[:, :known], v[:, :known], start + offset,
                                              self.block_size, self.retrieve_top_k, self.scale))
        return torch.cat(pieces, dim=1)
