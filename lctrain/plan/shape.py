"""The model's dimensions, read from a meta-device build (no memory, no weights), so every count is exact."""
from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass, field

import torch

from lctrain.config import ConfigError

SUPPORTED = ("attn", "gdn", "linear", "conv")


@dataclass(frozen=True)
class LayerShape:
    type: str
    params: int
    heads: int = 0
    kv_heads: int = 0
    head_dim: int = 0       # attn: per head; linear: K = V
    key_dim: int = 0        # gdn: per head K
    value_dim: int = 0      # gdn: per head V
    convs: tuple = ()       # (channels, kernel_size) of each short convolution


@dataclass(frozen=True)
class ModelShape:
    d_model: int
    ffn_dim: int
    vocab_size: int
    n_params: int
    matmul_params: int          # weights a token passes through (flops.py): non-embedding + the LM head
    layers: tuple = field(default_factory=tuple)
    block_params: int = 0       # parameters of the largest block (FSDP's unsharded working set)
    loss_chunk_tokens: int = 0      # 0: the cross-entropy's auto sizing (`lctrain.models.loss.loss_chunk_size`)
    layer_groups: tuple = ()    # ((LayerShape, how many layers have it), ...): per-layer sums loop over these
    trainable_params: int = 0   # parameters that train (gradients, optimizer state); 0: all (LoRA trains fewer)

    @property
    def trained(self) -> int:
        return self.trainable_params or self.n_params

    def grouped(self):
        return self.layer_groups or tuple((layer, 1) for layer in self.layers)

    def count(self, kind: str) -> int:
        return sum(1 for layer in self.layers if layer.type == kind)


def resolved_vocab(cfg) -> int:
    """model.vocab_size, or the size the trained tokenizer will have (data.vocab_size)."""
    return cfg.model.vocab_size or cfg.data.vocab_size


def model_shape(cfg) -> ModelShape:
    """Build `LanguageModel(cfg.model)` on the meta device and read its dimensions."""
    from lctrain.models import LanguageModel
    from lctrain.models.mixers import expand_pattern

    check_supported(expand_pattern(cfg.model.pattern, cfg.model.n_layers))
    model_cfg = dataclasses.replace(cfg.model, vocab_size=resolved_vocab(cfg), attn_plan="")
    with torch.device("meta"):
        model = LanguageModel(model_cfg)
    return shape_of(model)


def check_supported(layer_types) -> None:
    unsupported = sorted(set(layer_types) - set(SUPPORTED))
    if unsupported:
        raise ConfigError(f"plan: model.pattern uses {', '.join(unsupported)}, which the planner does not model "
                          f"(supported mixer types: {', '.join(SUPPORTED)})")


def shape_of(model) -> ModelShape:
    """Dimensions of a built `LanguageModel` (on any device)."""
    check_supported(model.layer_types)
    layers = tuple(_layer(block) for block in model.layers)
    head = model.embed.weight.numel() if model.lm_head is None else 0
    return ModelShape(d_model=model.cfg.d_model, ffn_dim=model.layers[0].mlp.up.out_features,
                      vocab_size=model.cfg.vocab_size, n_params=model.num_parameters(),
                      matmul_params=model.num_parameters(exclude_embedding=True) + head,
                      layers=layers,
                      block_params=max(layer.params for layer in layers),
                      loss_chunk_tokens=model.cfg.loss_chunk_tokens,
                      layer_groups=tuple(Counter(layers).items()),
                      trainable_params=trainable_params(model))


def trainable_params(model) -> int:
    """Parameters with gradients and optimizer state (fewer than all under LoRA: the frozen base has neither);
    0 when every parameter trains."""
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return 0 if trained == model.num_parameters() else trained


def _layer(block) -> LayerShape:
    mixer = block.mixer
    params = sum(p.numel() for p in block.parameters())
    kind = block.mixer_type
    if kind == "attn":
        return LayerShape(kind, params, heads=mixer.n_heads, kv_heads=mixer.n_kv_heads, head_dim=mixer.head_dim)
    if kind == "gdn":
        convs = tuple((c.weight.shape[0], c.kernel_size) for c in (mixer.q_conv, mixer.k_conv, mixer.v_conv))
        return LayerShape(kind, params, heads=mixer.n_heads, key_dim=mixer.head_k_dim, value_dim=mixer.head_v_dim,
                          convs=convs)
    if kind == "linear":
        return LayerShape(kind, params, heads=mixer.n_heads, head_dim=mixer.head_dim, key_dim=mixer.head_dim,
                          value_dim=mixer.head_dim)
    return LayerShape(kind, params, convs=((mixer.conv.weight.shape[0], mixer.conv.kernel_size),))
