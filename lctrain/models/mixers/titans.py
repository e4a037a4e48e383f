"""`titans`: Titans layers (Behrouz, Zhong & Mirrokni, 2024, "Titans: Learning to Memorize at Test Time").

A neural long-term memory is trained online while the sequence is read (`lctrain.kernels.titans_linear_memory`:
surprise = gradient of the memory's recall loss, with momentum and forgetting; or, with `memory_depth=2`, a
two-layer MLP memory updated through per-chunk functional gradients). Keys and queries are SiLU + L2-normalised;
alpha (forget), eta (momentum) and theta (learning rate) are per-token, per-head sigmoids of the input.
`persistent_tokens` learned vectors are prepended to every document (segment) and `variant` picks how memory and
attention combine:
  * "mac" (memory as context): each segment of `segment_len` tokens reads the memory as it stood at the segment
    start (one readout token per position), attends causally over [persistent | readouts | segment], writes the
    attention output into the memory, and gates it with the updated memory's readout;
  * "mag" (memory as gate): sliding-window attention (window `window`, persistent tokens as the always-visible
    sink) gated by the memory branch's output;
  * "mal" (memory as layer): the memory alone; combine with attention layers through `model.pattern`.
Documents of a packed batch are processed one by one (each starts from the initial memory).

Sequence parallelism (`ctx.sp`, every variant): the memory state is handed from rank to rank
(`lctrain.parallel.sp_state_passing`, exact wherever the shard boundaries fall) and MAG's windowed attention
fetches its halo and uses the persistent tokens as a per-document prefix (`lctrain.parallel.sp_local_attention`).
MAC hands on the memory at the last segment boundary with the straddling segment's earlier inputs, and the
receiver replays that segment from there (`lctrain.parallel.sp_memory_as_context`); all variants are exact.

Decoding (`ctx.cache`) keeps the layer's inputs so far and recomputes the layer on them, returning the new
positions: exact, at O(T) cost per step.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from lctrain.config import ConfigError
from lctrain.kernels import titans_linear_memory
from lctrain.kernels.titans_memory.mlp import mlp_memory_read, mlp_titans_memory
from lctrain.models.blocks import RMSNorm, RotaryEmbedding
from lctrain.models.context import BatchContext
from lctrain.models.mixers.registry import register_mixer

try:  # the sliding-window op, when this build has it; otherwise SDPA with a window mask
    from lctrain.kernels.local_attention import local_attention
except ImportError:  # pragma: no cover - depends on the build
    local_attention = None

VARIANTS = ("mac", "mag", "mal")


def _windowed_attention(q, k, v, window: int, sink: int, scale: float) -> torch.Tensor:
    """Causal attention where query i sees key j iff j <= i and (i - j < window or j < sink); q, k, v
    `[N, L, H, D]` with one sequence per row."""
    if local_attention is not None:
        return local_attention(q, k, v, window, sink=sink, scale=scale)
    index = torch.arange(q.shape[1], device=q.device)
    gap = index[:, None] - index[None, :]
    mask = (gap >= 0) & ((gap < window) | (index[None, :] < sink))
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=mask, scale=scale)
    return out.transpose(1, 2)


@register_mixer("titans", "T")
class Titans(nn.Module):
    """x `[B, T, D]` -> `[B, T, D]`; options in `model.mixers.titans` (see the module docstring)."""

    def __init__(self, model_cfg, layer_idx: int, variant: str = "mac", chunk_size: int = 16,
                 memory_depth: int = 1, memory_hidden: int = 0, persistent_tokens: int = 4, segment_len: int = 64,
                 window: int = 64, rope_theta: float | None = None, backend: str | None = None):
        super().__init__()
        if variant not in VARIANTS:
            raise ConfigError(f"model.mixers.titans.variant: {variant!r} is not one of {', '.join(VARIANTS)}")
        if memory_depth not in (1, 2):
            raise ConfigError(f"model.mixers.titans.memory_depth: expected 1 (linear) or 2 (MLP), got {memory_depth!r}")
        for name, value, low in (("chunk_size", chunk_size, 1), ("persistent_tokens", persistent_tokens, 0),
                                 ("segment_len", segment_len, 1), ("window", window, 1),
                                 ("memory_hidden", memory_hidden, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"model.mixers.titans.{name}: expected an integer >= {low}, got {value!r}")
        d = model_cfg.d_model
        self.layer_idx = layer_idx
        self.variant, self.chunk_size, self.memory_depth = variant, chunk_size, memory_depth
        self.segment_len, self.window, self.backend = segment_len, window, backend
        self.n_heads = model_cfg.n_heads
        self.head_dim = model_cfg.head_dim or d // self.n_heads
        inner = self.n_heads * self.head_dim
        self.scale = 1.0 / math.sqrt(self.head_dim)
        # Memory: keys/queries [H, K], values [H, V] with K = V = head_dim.
        self.mem_qkv = nn.Linear(d, 3 * inner, bias=False)
        self.mem_gates = nn.Linear(d, 3 * self.n_heads, bias=True)  # alpha, eta, theta logits
        self.mem_norm = RMSNorm(self.head_dim, model_cfg.norm_eps)
        if memory_depth == 2:
            hidden = memory_hidden or 2 * self.head_dim
            # Learned initial weights of the MLP memory (an all-zero MLP could never learn).
            self.mem_w1 = nn.Parameter(torch.randn(self.n_heads, self.head_dim, hidden) / math.sqrt(self.head_dim))
            self.mem_w2 = nn.Parameter(torch.randn(self.n_heads, hidden, self.head_dim) / math.sqrt(hidden))
        self.init_std = model_cfg.init_std
        self.persistent = nn.Parameter(torch.randn(persistent_tokens, d) * model_cfg.init_std)
        if variant != "mal":
            self.attn_qkv = nn.Linear(d, 3 * inner, bias=False)
            self.attn_norm = RMSNorm(self.head_dim, model_cfg.norm_eps)
            self.rope = RotaryEmbedding(self.head_dim, rope_theta or model_cfg.rope_theta)
        if variant == "mac":
            self.mem_read_q = nn.Linear(d, inner, bias=False)  # queries reading the memory before the segment
            self.readout_proj = nn.Linear(inner, d, bias=False)  # readouts become attention tokens
            self.attn_out = nn.Linear(inner, d, bias=False)  # attention output, written into the memory
        self.o_proj = nn.Linear(inner, d, bias=False)
        self.o_proj._is_residual_out = True
        self.init_extra_()

    def init_extra_(self) -> None:
        # Start forgetting little (alpha ~ 0.02), with momentum ~ 0.9 and a moderate step size (theta ~ 0.1).
        with torch.no_grad():
            if self.memory_depth == 2:
                self.mem_w1.normal_(0.0, 1.0 / math.sqrt(self.mem_w1.shape[1]))
                self.mem_w2.normal_(0.0, 1.0 / math.sqrt(self.mem_w2.shape[1]))
            self.persistent.normal_(0.0, self.init_std)
            bias = self.mem_gates.bias.view(3, self.n_heads)
            bias[0].fill_(-4.0)
            bias[1].fill_(2.0)
            bias[2].fill_(-2.0)

    # ------------------------------------------------------------------------------------------------ memory
    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.n_heads, self.head_dim))

    def _initial_state(self, rows: int, like: torch.Tensor):
        shape = (rows, self.n_heads, self.head_dim, self.head_dim)
        if self.memory_depth == 1:
            zeros = like.new_zeros(shape, dtype=torch.float64 if like.dtype == torch.float64 else torch.float32)
            return zeros, zeros
        weights = tuple(w.unsqueeze(0).expand(rows, *w.shape) for w in (self.mem_w1, self.mem_w2))
        return weights, tuple(torch.zeros_like(w) for w in weights)

    def _memory(self, x: torch.Tensor, state):
        """Write x `[N, L, D]` into the memory starting from `state`; return its readouts `[N, L, H, V]` after
        each token, and the state after the last one."""
        q, k, v = self._heads_qkv(self.mem_qkv(x))
        q = F.normalize(F.silu(q), dim=-1)
        k = F.normalize(F.silu(k), dim=-1)
        logits = self.mem_gates(x)
        gate_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32  # gates never in half precision
        alpha, eta, theta = torch.sigmoid(logits.to(gate_dtype)).unflatten(-1, (3, self.n_heads)).unbind(-2)
        if self.memory_depth == 2:
            return mlp_titans_memory(q, k, v, alpha, eta, theta, self.chunk_size, state)
        return titans_linear_memory(q, k, v, alpha, eta, theta, chunk_size=self.chunk_size, initial_state=state,
                                    output_final_state=True, backend=self.backend)

    def _heads_qkv(self, fused: torch.Tensor):
        return tuple(self._heads(part) for part in fused.chunk(3, dim=-1))

    def _read(self, state, q: torch.Tensor) -> torch.Tensor:
        """Readout of the memory `state` (not updated) for queries q `[N, L, H, K]` -> `[N, L, H, V]`."""
        if self.memory_depth == 2:
            weights = tuple(w.unsqueeze(1) for w in state[0])  # broadcast over positions
            return mlp_memory_read(weights, q.to(weights[0].dtype)).to(q.dtype)
        return torch.einsum("nlhk,nhkv->nlhv", q, state[0].to(q.dtype))

    # ------------------------------------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, ctx: BatchContext) -> torch.Tensor:
        if ctx.sp is not None and ctx.cache is None:
            return self._sequence_parallel(x, ctx.sp)
        if ctx.cache is not None:
            return self._decode(x, ctx.cache)
        batch, seqlen, dim = x.shape
        if ctx.cu_seqlens is None:
            return self._documents(x)
        flat = x.reshape(batch * seqlen, dim)
        # Host offsets (no device read); a compiled block specialises on this batch's document lengths.
        bounds = list(ctx.docs.offsets) if ctx.docs is not None else ctx.cu_seqlens.tolist()
        lengths = [end - start for start, end in zip(bounds[:-1], bounds[1:])]
        if len(set(lengths)) == 1:  # equal documents (one per row is the common case) run as one batch
            return self._documents(flat.view(len(lengths), lengths[0], dim)).reshape(batch, seqlen, dim)
        pieces = [self._documents(flat[start:end].unsqueeze(0))[0]
                  for start, end in zip(bounds[:-1], bounds[1:]) if end > start]
        return torch.cat(pieces, dim=0).view(batch, seqlen, dim)

    def _sequence_parallel(self, x: torch.Tensor, placement) -> torch.Tensor:
        """This rank's tokens `[B, T_local, D]` of a sharded batch: the memory state (with the inputs after its
        last chunk boundary, or for MAC its last segment boundary) is handed from rank to rank, so the result
        equals `_documents` on whole documents."""
        from lctrain.parallel import document_offsets, sp_local_attention, sp_memory_as_context, sp_state_passing
        if self.variant == "mac":
            # segments are the unit handed from rank to rank: the memory at the last segment boundary plus the
            # straddling segment's earlier inputs (see `lctrain.parallel.titans_mac_sp`)
            gated = sp_memory_as_context(self._mac_segment, x, placement, self.segment_len,
                                         lambda like: self._initial_state(1, like))
            return self.o_proj(gated.flatten(2))
        memory_out = sp_state_passing(self._memory, x, placement, self.chunk_size,
                                      lambda like: self._initial_state(1, like), prefix=self.persistent)
        memory_out = self.mem_norm(memory_out)
        if self.variant == "mal":
            return self.o_proj(memory_out.flatten(2))
        # mag: each document is attended as [persistent | document] (persistent tokens at positions 0 .. P-1 and
        # always visible, the document from position P on), like `_documents`
        prefix = self.persistent.shape[0]
        q, k, v = self._heads_qkv(self.attn_qkv(x))
        cos, sin = self.rope.cos_sin(document_offsets(placement) + prefix)
        q, k = RotaryEmbedding.rotate(q, cos, sin), RotaryEmbedding.rotate(k, cos, sin)
        _, prefix_k, prefix_v = self._heads_qkv(self.attn_qkv(self.persistent.to(x.dtype)[None]))
        cos, sin = self.rope.cos_sin(torch.arange(prefix, device=x.device)[None])
        prefix_k = RotaryEmbedding.rotate(prefix_k, cos, sin)
        attended = sp_local_attention(q, k, v, self.window, 0, self.scale, placement,
                                      prefix=(prefix_k[0], prefix_v[0]))
        return self.o_proj((self.attn_norm(attended) * torch.sigmoid(memory_out)).flatten(2))

    def _decode(self, x: torch.Tensor, cache: dict) -> torch.Tensor:
        entry = cache.setdefault(self.layer_idx, {})
        history = x if "inputs" not in entry else torch.cat([entry["inputs"], x], dim=1)
        entry["inputs"] = history
        return self._documents(history)[:, -x.shape[1]:]

    def _documents(self, x: torch.Tensor) -> torch.Tensor:
        """Every row of x `[N, L, D]` is one document starting at position 0."""
        rows, length, _ = x.shape
        if length == 0:
            return x
        with_persistent = torch.cat([self.persistent.to(x.dtype).expand(rows, -1, -1), x], dim=1)
        prefix = self.persistent.shape[0]
        if self.variant == "mac":
            return self._memory_as_context(x)
        memory_out, _ = self._memory(with_persistent, self._initial_state(rows, x))
        memory_out = self.mem_norm(memory_out[:, prefix:])
        if self.variant == "mal":
            return self.o_proj(memory_out.flatten(2))
        q, k, v = self._heads_qkv(self.attn_qkv(with_persistent))
        positions = torch.arange(prefix + length, device=x.device).expand(rows, -1)
        cos, sin = self.rope.cos_sin(positions)
        q, k = RotaryEmbedding.rotate(q, cos, sin), RotaryEmbedding.rotate(k, cos, sin)
        attended = _windowed_attention(q, k, v, self.window, prefix, self.scale)[:, prefix:]
        return self.o_proj((self.attn_norm(attended) * torch.sigmoid(memory_out)).flatten(2))

    def _memory_as_context(self, x: torch.Tensor) -> torch.Tensor:
        state = self._initial_state(x.shape[0], x)
        outputs = []
        for start in range(0, x.shape[1], self.segment_len):
            out, state = self._mac_segment(x[:, start:start + self.segment_len], state)
            outputs.append(out)
        return self.o_proj(torch.cat(outputs, dim=1).flatten(2))

    def _mac_segment(self, segment: torch.Tensor, state):
        """One MAC segment x `[N, S, D]` (S <= segment_len, starting at a segment boundary) reading the memory
        `state` as it stands at its start -> (gated attention output `[N, S, H, V]`, the state after it)."""
        rows, size, _ = segment.shape
        prefix = self.persistent.shape[0]
        read_q = F.normalize(F.silu(self._heads(self.mem_read_q(segment))), dim=-1)
        readouts = self.readout_proj(self._read(state, read_q).flatten(2))  # [N, S, D]
        tokens = torch.cat([self.persistent.to(segment.dtype).expand(rows, -1, -1), readouts, segment], dim=1)
        q, k, v = self._heads_qkv(self.attn_qkv(tokens))
        # Positions: persistent tokens at 0, readout j and segment token j both at j + 1.
        local = torch.arange(1, size + 1, device=segment.device)
        positions = torch.cat([local.new_zeros(prefix), local, local]).expand(rows, -1)
        cos, sin = self.rope.cos_sin(positions)
        q, k = RotaryEmbedding.rotate(q, cos, sin), RotaryEmbedding.rotate(k, cos, sin)
        # Segment token i sees every persistent token, readouts j <= i and segment tokens j <= i.
        causal = torch.ones(size, size, dtype=torch.bool, device=segment.device).tril()
        mask = torch.cat([causal.new_ones(size, prefix), causal, causal], dim=1)
        attended = F.scaled_dot_product_attention(
            q[:, -size:].transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
            scale=self.scale).transpose(1, 2)
        attended = self.attn_norm(attended)
        memory_out, state = self._memory(self.attn_out(attended.flatten(2)), state)
        return attended * torch.sigmoid(self.mem_norm(memory_out)), state
