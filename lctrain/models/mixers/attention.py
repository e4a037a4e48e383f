"""`attn`: causal softmax attention with RoPE, GQA and document masking for packed sequences.

Besides full attention it has the sparse patterns of two context-extension methods:

* `mode: sf_attn` / `s2_attn` (SinkLoRA / LongLoRA): while training, heads attend within groups of tokens (half of
  them shifted by half a group) plus, for sf_attn, the first `sink` tokens of the document; evaluation and
  decoding use full attention (`lctrain.kernels.sf_attention`).
* a MoA plan (`model.attn_plan`): each head keeps an elastic sliding window alpha + beta * N plus the plan's sink
  tokens, at training and inference (`lctrain.kernels.local_attention` with per-head windows).
"""
from __future__ import annotations


import torch
import torch.nn as nn
import torch.nn.functional as F

from lctrain.config import ConfigError
from lctrain.kernels import local_attention
from lctrain.models.context import BatchContext, document_ids
from lctrain.models.mixers.qkv import add_qkv, rotated_qkv
from lctrain.models.mixers.registry import register_mixer

try:  # flash-attn is an optional extra; used for CUDA bf16/fp16 when installed
    from flash_attn import flash_attn_varlen_func
except Exception:  # pragma: no cover - depends on the environment
    flash_attn_varlen_func = None


def document_causal_mask(q_docs: torch.Tensor, k_docs: torch.Tensor, q_index: torch.Tensor,
                         k_index: torch.Tensor) -> torch.Tensor:
    """Boolean [B, 1, Tq, Tk]: key j is visible to query i iff same document and j <= i (global indices)."""
    same = q_docs[:, :, None] == k_docs[:, None, :]
    causal = k_index[None, None, :] <= q_index[None, :, None]
    return (same & causal)[:, None]


def packed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, position_ids: torch.Tensor,
                     scale: float, backend: str = "auto") -> torch.Tensor:
    """Causal attention within documents. q [B, T, H, D], k/v [B, T, Hkv, D] (Hkv divides H) -> [B, T, H, D]."""
    batch, seqlen, heads, dim = q.shape
    use_flash = (backend in ("auto", "flash") and flash_attn_varlen_func is not None and q.is_cuda
                 and q.dtype in (torch.float16, torch.bfloat16))
    if backend == "flash" and not use_flash:
        raise RuntimeError("model.attn_backend='flash' needs flash-attn installed and CUDA bf16/fp16 tensors")
    if use_flash:
        from lctrain.models.context import cu_seqlens_from_positions
        cu = cu_seqlens_from_positions(position_ids)
        max_len = int((cu[1:] - cu[:-1]).max())
        out = flash_attn_varlen_func(q.reshape(batch * seqlen, heads, dim), k.reshape(batch * seqlen, -1, dim),
                                     v.reshape(batch * seqlen, -1, dim), cu, cu, max_len, max_len,
                                     softmax_scale=scale, causal=True)
        return out.reshape(batch, seqlen, heads, dim)
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    gqa = kt.shape[1] != qt.shape[1]
    single_document = bool((position_ids[:, 1:] != 0).all()) if seqlen > 1 else True
    if single_document:
        out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=scale, enable_gqa=gqa)
    else:
        docs = document_ids(position_ids)
        index = torch.arange(seqlen, device=q.device)
        mask = document_causal_mask(docs, docs, index, index)
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=scale, enable_gqa=gqa)
    return out.transpose(1, 2)


@register_mixer("attn", "A")
class Attention(nn.Module):
    """Multi-head (grouped-query) causal self-attention.

    x [B, T, D] -> [B, T, D]. Queries have `n_heads` heads, keys/values `n_kv_heads`; RoPE on q and k with the
    batch's positions (reset per document); attention never crosses a document boundary.

    Options (`model.mixers.attn`): rope_theta; rope_scaling (position interpolation factor, e.g. 4 to extend a
    model to 4x its training length); mode (`full`, or `sf_attn` / `s2_attn` while training); group_size (tokens
    per group for those modes; 0: a quarter of the sequence); sink (sf_attn: global first tokens, default 4).
    """

    MODES = ("full", "sf_attn", "s2_attn")

    def __init__(self, model_cfg, layer_idx: int, rope_theta: float | None = None, rope_scaling: float = 1.0,
                 qk_norm: bool = False, mode: str = "full", group_size: int = 0, sink: int = 4):
        super().__init__()
        if mode not in self.MODES:
            raise ConfigError(f"model.mixers.attn.mode: {mode!r} is not allowed; expected one of {self.MODES}")
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 0 or group_size % 2:
            raise ConfigError(f"model.mixers.attn.group_size: {group_size!r}; expected 0 (a quarter of the "
                              "sequence) or an even integer >= 2")
        if isinstance(sink, bool) or not isinstance(sink, int) or sink < 0:
            raise ConfigError(f"model.mixers.attn.sink: {sink!r}; expected an integer >= 0")
        if isinstance(rope_scaling, bool) or not isinstance(rope_scaling, (int, float)) or rope_scaling <= 0:
            raise ConfigError(f"model.mixers.attn.rope_scaling: {rope_scaling!r}; expected a positive number")
        if mode != "full" and model_cfg.n_heads % 2:
            raise ConfigError(f"model.mixers.attn.mode: {mode!r} splits heads in two halves; model.n_heads="
                              f"{model_cfg.n_heads} is odd")
        self.mode, self.group_size, self.sink = mode, group_size, sink
        self.plan = None  # MoA plan (set_plan)
        self.kv_budget = None  # (budget, recent): H2O cache eviction while decoding (lctrain.eval.h2o)
        self.layer_idx = layer_idx
        self.backend = model_cfg.attn_backend
        add_qkv(self, model_cfg, rope_theta, rope_scaling)

    def set_plan(self, plan: dict | None) -> None:
        """Use this layer's per-head rules from a MoA plan (None, or a plan without this layer: full attention).
        The model sets it from `model.attn_plan` (`lctrain.moa.apply.set_attn_plan`)."""
        self.plan = plan if plan is not None and str(self.layer_idx) in plan["layers"] else None

    def _plan_spans(self, length: int, device) -> tuple[torch.Tensor, int]:
        from lctrain.moa.plan import head_windows, plan_sink
        return head_windows(self.plan, self.layer_idx, length).to(device), plan_sink(self.plan)

    def forward(self, x: torch.Tensor, ctx: BatchContext) -> torch.Tensor:
        batch, seqlen, _ = x.shape
        q, k, v = rotated_qkv(self, x, ctx)
        probe = ctx.extras.get("attn_probe")
        sparse_training = self.training and self.mode != "full"
        if ctx.sp is not None and sparse_training:
            raise ConfigError("model.mixers.attn: the sf_attn/s2_attn modes do not run under sequence parallelism "
                              "(parallel.sp > 1) yet; use sp=1")
        if ctx.cache is not None:
            o = self._attend_cached(q, k, v, ctx.cache)
        elif probe is not None:
            o = probed_attention(q, k, v, ctx.position_ids, self.scale, lambda a: probe(self.layer_idx, a))
        elif ctx.sp is not None and self.plan is not None:
            from lctrain.parallel import sp_local_attention  # spans for the whole (unpadded) row
            windows, sink = self._plan_spans(ctx.sp.orig_len, q.device)
            o = sp_local_attention(q, k, v, windows, sink, self.scale, ctx.sp)
        elif ctx.sp is not None:
            from lctrain.parallel import sp_attention
            o = sp_attention(q, k, v, ctx.sp, scale=self.scale)
        elif sparse_training:
            o = self._grouped(q, k, v, ctx)
        elif self.plan is not None:
            windows, sink = self._plan_spans(seqlen, q.device)
            o = self._local(q, k, v, ctx, windows, sink)
        else:
            o = packed_attention(q, k, v, ctx.position_ids, self.scale, self.backend)
        return self.o_proj(o.reshape(batch, seqlen, -1))

    def _local(self, q, k, v, ctx: BatchContext, window, sink) -> torch.Tensor:
        """Sliding window + sink through the local_attention kernel (rows flattened when documents are packed)."""
        if ctx.cu_seqlens is None:
            return local_attention(q, k, v, window, sink, self.scale)
        batch, seqlen = q.shape[:2]
        flat = [t.reshape(1, batch * seqlen, *t.shape[2:]) for t in (q, k, v)]
        o = local_attention(*flat, window, sink, self.scale, cu_seqlens=ctx.cu_seqlens)
        return o.view(batch, seqlen, *o.shape[2:])

    def _grouped(self, q, k, v, ctx: BatchContext) -> torch.Tensor:
        """SF-Attn / S²-Attn over groups of `group_size` tokens (a quarter of the sequence when 0)."""
        from lctrain.kernels.sf_attention import sf_attention
        seqlen = q.shape[1]
        group = self.group_size or max(2, seqlen // 8 * 2)
        variant = "sf" if self.mode == "sf_attn" else "s2"
        return sf_attention(q, k, v, group, sink=self.sink if variant == "sf" else 0, scale=self.scale,
                            cu_seqlens=ctx.cu_seqlens, variant=variant)

    def _attend_cached(self, q, k, v, cache: dict) -> torch.Tensor:
        """Incremental decoding (one document per row): append k/v to the cache and attend to all of it (or to
        what H2O keeps, with a budget)."""
        entry = cache.setdefault(self.layer_idx, {})
        if self.kv_budget is not None:
            if self.plan is not None:
                raise ConfigError("attn: a KV budget (H2O) and a MoA plan cannot be combined")
            from lctrain.eval.h2o import h2o_attend
            return h2o_attend(q, k, v, entry, *self.kv_budget, self.scale)
        if "k" in entry:
            k = torch.cat([entry["k"], k], dim=1)
            v = torch.cat([entry["v"], v], dim=1)
        entry["k"], entry["v"] = k, v
        new, total = q.shape[1], k.shape[1]
        q_index = torch.arange(total - new, total, device=q.device)
        k_index = torch.arange(total, device=q.device)
        mask = (k_index[None, :] <= q_index[:, None])[None, None]
        if self.plan is not None:  # MoA spans for the length reached so far; every key stays cached
            windows, sink = self._plan_spans(total, q.device)
            distance = q_index[:, None] - k_index[None, :]
            mask = mask & ((distance[None] < windows[:, None, None]) | (k_index < sink)[None, None])[None]
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=mask, scale=self.scale,
                                             enable_gqa=self.n_kv_heads != self.n_heads)
        return out.transpose(1, 2)


def probed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, position_ids: torch.Tensor, scale: float,
                     probe) -> torch.Tensor:
    """Dense attention with the probabilities materialised, `[B, H, T, T]`, and handed to `probe(probs)`, which
    may keep them (MoA profiling reads their gradient) and returns the probabilities to use. O(T^2) memory: for
    profiling only."""
    group = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
    docs = document_ids(position_ids)
    index = torch.arange(q.shape[1], device=q.device)
    mask = document_causal_mask(docs, docs, index, index)
    scores = torch.einsum("bihd,bjhd->bhij", q, k) * scale
    probs = probe(scores.masked_fill(~mask, float("-inf")).softmax(dim=-1))
    return torch.einsum("bhij,bjhd->bihd", probs, v)
