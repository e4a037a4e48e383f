"""Weight names: lctrain's `LanguageModel` <-> the Hugging Face layout (Llama names for the shared parts).

    lctrain                          Hugging Face
    embed.weight                     model.embed_tokens.weight
    layers.i.mixer_norm.weight       model.layers.i.input_layernorm.weight
    layers.i.mixer.<p>               model.layers.i.self_attn.<p>   (Llama)  /  model.layers.i.mixer.<p>  (lctrain)
    layers.i.mlp_norm.weight         model.layers.i.post_attention_layernorm.weight
    layers.i.mlp.{gate,up,down}.w    model.layers.i.mlp.{gate,up,down}_proj.weight
    norm.weight                      model.norm.weight
    lm_head.weight                   lm_head.weight (absent when the embedding is tied)

Inside a mixer the names are lctrain's own; the attention mixer already uses Llama's q/k/v/o_proj.
"""
from __future__ import annotations

import re

_MLP = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
_MLP_BACK = {v: k for k, v in _MLP.items()}
_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")
_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def to_hf(name: str, mixer_prefix: str = "mixer") -> str:
    """lctrain parameter name -> Hugging Face name; `mixer_prefix` is `self_attn` for a Llama export."""
    if name == "embed.weight":
        return "model.embed_tokens.weight"
    if name == "norm.weight":
        return "model.norm.weight"
    if name == "lm_head.weight":
        return name
    match = _LAYER.match(name)
    if not match:
        raise KeyError(f"no Hugging Face name for lctrain weight {name!r}")
    layer, rest = match.groups()
    head, _, tail = rest.partition(".")
    if head == "mixer_norm":
        return f"model.layers.{layer}.input_layernorm.{tail}"
    if head == "mlp_norm":
        return f"model.layers.{layer}.post_attention_layernorm.{tail}"
    if head == "mlp":
        proj, _, param = tail.partition(".")
        return f"model.layers.{layer}.mlp.{_MLP[proj]}.{param}"
    if head == "mixer":
        return f"model.layers.{layer}.{mixer_prefix}.{tail}"
    raise KeyError(f"no Hugging Face name for lctrain weight {name!r}")


def from_hf(name: str) -> str:
    """Hugging Face name (Llama or lctrain export) -> lctrain parameter name."""
    if name == "model.embed_tokens.weight":
        return "embed.weight"
    if name == "model.norm.weight":
        return "norm.weight"
    if name == "lm_head.weight":
        return name
    match = _HF_LAYER.match(name)
    if not match:
        raise KeyError(f"unexpected weight {name!r} (not a Llama-family decoder weight)")
    layer, rest = match.groups()
    head, _, tail = rest.partition(".")
    if head == "input_layernorm":
        return f"layers.{layer}.mixer_norm.{tail}"
    if head == "post_attention_layernorm":
        return f"layers.{layer}.mlp_norm.{tail}"
    if head == "mlp":
        proj, _, param = tail.partition(".")
        if proj not in _MLP_BACK:
            raise KeyError(f"unexpected MLP weight {name!r}")
        return f"layers.{layer}.mlp.{_MLP_BACK[proj]}.{param}"
    if head in ("self_attn", "mixer"):
        return f"layers.{layer}.mixer.{tail}"
    raise KeyError(f"unexpected weight {name!r} (not a Llama-family decoder weight)")
