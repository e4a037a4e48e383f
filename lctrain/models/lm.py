"""Decoder-only language model whose layers come from a pattern of mixer types."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from lctrain.models.blocks import RMSNorm, SwiGLU, default_ffn_dim
from lctrain.models.context import BatchContext
from lctrain.models.init import init_module_tree_
from lctrain.models.loss import chunked_cross_entropy_sum
from lctrain.models.mixers import build_mixer, expand_pattern


class Block(nn.Module):
    """Pre-norm residual block: x + mixer(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, model_cfg, layer_idx: int, mixer_type: str):
        super().__init__()
        d = model_cfg.d_model
        self.mixer_type = mixer_type
        self.mixer_norm = RMSNorm(d, model_cfg.norm_eps)
        self.mixer = build_mixer(mixer_type, model_cfg, layer_idx)
        self.mlp_norm = RMSNorm(d, model_cfg.norm_eps)
        self.mlp = SwiGLU(d, model_cfg.ffn_dim or default_ffn_dim(d))

    def forward(self, x: torch.Tensor, ctx: BatchContext) -> torch.Tensor:
        x = x + self.mixer(self.mixer_norm(x), ctx)
        return x + self.mlp(self.mlp_norm(x))


@dataclass
class LMOutput:
    loss_sum: torch.Tensor | None = None  # summed token cross-entropy (fp32)
    n_targets: torch.Tensor | None = None  # number of target tokens that loss_sum covers
    logits: torch.Tensor | None = None  # [B, T, vocab] when asked for
    hidden: torch.Tensor | None = None  # final-norm output [B, T, D]


class LanguageModel(nn.Module):
    """Token embedding -> blocks (mixer types from `model.pattern`) -> RMSNorm -> LM head."""

    def __init__(self, model_cfg):
        super().__init__()
        if model_cfg.vocab_size <= 0:
            raise ValueError("model.vocab_size must be resolved (from the tokenizer) before building the model")
        self.cfg = model_cfg
        # Drawn before any constructor touches the RNG: initial values depend on the seed, not on how (or on which
        # device) the model was built, so a meta-built model materialised shard by shard gets the same weights.
        self.init_seed = int(torch.randint(0, 2**62, (1,), device="cpu"))
        self.layer_types = expand_pattern(model_cfg.pattern, model_cfg.n_layers)
        self.embed = nn.Embedding(model_cfg.vocab_size, model_cfg.d_model)
        self.layers = nn.ModuleList(Block(model_cfg, i, t) for i, t in enumerate(self.layer_types))
        self.norm = RMSNorm(model_cfg.d_model, model_cfg.norm_eps)
        self.lm_head = None if model_cfg.tie_embeddings else nn.Linear(model_cfg.d_model, model_cfg.vocab_size, bias=False)
        self.activation_checkpointing = model_cfg.activation_checkpointing
        self.reset_parameters()
        if model_cfg.attn_plan:  # MoA: per-head spans for the attention layers, read once for all of them
            from lctrain.moa.apply import set_attn_plan
            set_attn_plan(self, model_cfg.attn_plan, where="model.attn_plan")

    @property
    def head_weight(self) -> torch.Tensor:
        return self.embed.weight if self.lm_head is None else self.lm_head.weight

    def reset_parameters(self) -> None:
        """Normal(0, std) weights; the last projection of each residual branch is scaled by 1/sqrt(2 * n_layers)
        so the residual stream's variance does not grow with depth. Mixers may define `init_extra_` for their own
        special parameters (decay rates, gate biases). Each module draws from its own seeded generator
        (`lctrain.models.init`), so `init_module_(name, module)` on one piece gives the same values."""
        self.init_module_("", self)

    def init_module_(self, path: str, module: nn.Module) -> None:
        """Initialise the submodule at dotted `path` (its parameters real CPU tensors) as `reset_parameters` would."""
        init_module_tree_(module, path, self.init_seed, self.cfg.init_std, self.cfg.n_layers)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, ctx: BatchContext | None = None,
                return_logits: bool = False, loss_fn=None) -> LMOutput:
        """input_ids/position_ids/labels [B, T] (labels -100 = ignored). Without `ctx`, document boundaries come
        from position ids (0 at each document start; default: one document per row). `loss_fn(hidden [N, D],
        head_weight, labels [N]) -> (loss_sum, n_targets)` replaces the cross-entropy (distillation); it runs inside
        forward, where a sharding engine has the LM head's weight whole."""
        batch, seqlen = input_ids.shape
        if ctx is None:
            if position_ids is None:
                position_ids = torch.arange(seqlen, device=input_ids.device).expand(batch, seqlen)
            ctx = BatchContext.from_positions(position_ids)
        x = self.embed(input_ids)
        for layer in self.layers:
            if self.activation_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, ctx, use_reentrant=False)
            else:
                x = layer(x, ctx)
        hidden = self.norm(x)
        out = LMOutput(hidden=hidden)
        if labels is not None:
            loss = loss_fn or (lambda h, w, y: chunked_cross_entropy_sum(h, w, y, self.cfg.loss_chunk_tokens))
            out.loss_sum, out.n_targets = loss(hidden.reshape(batch * seqlen, -1), self.head_weight, labels.reshape(-1))
        if return_logits:
            out.logits = F.linear(hidden, self.head_weight)
        return out

    def num_parameters(self, exclude_embedding: bool = False) -> int:
        total = sum(p.numel() for p in self.parameters())
        if exclude_embedding:
            total -= self.embed.weight.numel()
        return total
