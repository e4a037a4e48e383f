"""Which layers change, and how a new layer is initialised from the attention layer it replaces.

The target keeps the source's residual stream, MLPs, norms and embeddings. An `attn` layer that becomes
- `gdn` (G): q/k/v/o projections copied (GQA keys/values expanded to one head per query head, head_k_dim =
  head_v_dim = the attention head size), short convolutions set to the identity (the current token only), the
  beta projection to zero (beta = 1/2 everywhere), and data-independent decays spread from 0.9 to 0.999 per token
  across heads, so the layer starts as a slowly forgetting linear-attention reading of the old one;
- `linear` (L): q/k/v/o copied (keys/values expanded), its fixed per-head decays kept;
- `swa` (S): every projection copied as is (the same layout, now with a window).
Other types cannot be read off an attention layer and are refused.
"""
from __future__ import annotations

import copy
import math

import torch

from lctrain.config import ConfigError
from lctrain.models.mixers import LETTERS, expand_pattern

CONVERTIBLE = ("gdn", "linear", "swa")


def target_layer_types(source_types: list[str], convert_cfg) -> list[str]:
    """The converted model's layer types (registry names), one per source layer."""
    n = len(source_types)
    if convert_cfg.pattern:
        try:
            target = expand_pattern(convert_cfg.pattern, n)
        except ConfigError as exc:
            raise ConfigError(f"convert.pattern: {str(exc).removeprefix('model.pattern: ')}") from None
    else:
        into = expand_pattern(convert_cfg.into, 1)[0] if convert_cfg.into in LETTERS else convert_cfg.into
        target = [t if t != "attn" or (i + 1) % convert_cfg.keep_every == 0 else into
                  for i, t in enumerate(source_types)]
    for i, (old, new) in enumerate(zip(source_types, target)):
        if old != new and (old != "attn" or new not in CONVERTIBLE):
            raise ConfigError(f"convert.pattern: layer {i} would turn {old!r} into {new!r}; only `attn` layers "
                              f"convert, into one of {CONVERTIBLE} (letters G, L, S)")
    return target


def convert_model_config(model_cfg, convert_cfg):
    """Rewrite `model_cfg` (already following the source checkpoint) into the target; return the source's config
    (the teacher's). New GDN layers get the attention head geometry unless the recipe set theirs."""
    source = copy.deepcopy(model_cfg)
    source_types = expand_pattern(source.pattern, source.n_layers)
    target = target_layer_types(source_types, convert_cfg)
    if target == source_types:
        raise ConfigError(f"convert.pattern: the target {convert_cfg.pattern or convert_cfg.into!r} changes no layer "
                          f"of the source pattern {source.pattern!r}")
    head_dim = source.head_dim or source.d_model // source.n_heads
    mixers = {k: dict(v or {}) for k, v in (model_cfg.mixers or {}).items()}
    if "gdn" in target:
        gdn = mixers.setdefault("gdn", {})
        for key, value in (("n_heads", source.n_heads), ("head_k_dim", head_dim), ("head_v_dim", head_dim)):
            gdn.setdefault(key, value)
    letter_of = {name: letter for letter, name in LETTERS.items()}
    model_cfg.pattern = "".join(letter_of[t] for t in target)
    model_cfg.mixers = mixers
    return source


def converted_layers(student) -> list[int]:
    """Indices of the layers whose type differs from the teacher's (set by `init_from_attention`)."""
    return list(getattr(student, "_converted_layers", []))


def _expand_kv(weight: torch.Tensor, kv_heads: int, heads: int) -> torch.Tensor:
    """`[Hkv * hd, d]` -> `[H * hd, d]`: query head h reads kv head h // (H / Hkv), as grouped-query attention does."""
    return weight.view(kv_heads, -1, weight.shape[-1]).repeat_interleave(heads // kv_heads, dim=0).reshape(
        -1, weight.shape[-1])


def _init_gdn(new, old) -> None:
    heads, kv = old.n_heads, old.n_kv_heads
    if new.n_heads != heads or new.head_k_dim != old.head_dim or new.head_v_dim != old.head_dim:
        raise ConfigError(f"model.mixers.gdn: a converted layer needs n_heads={heads}, head_k_dim=head_v_dim="
                          f"{old.head_dim} (the attention's); got {new.n_heads}, {new.head_k_dim}, {new.head_v_dim}")
    new.q_proj.weight.copy_(old.q_proj.weight)
    new.k_proj.weight.copy_(_expand_kv(old.k_proj.weight, kv, heads))
    new.v_proj.weight.copy_(_expand_kv(old.v_proj.weight, kv, heads))
    new.o_proj.weight.copy_(old.o_proj.weight)
    for conv in (new.q_conv, new.k_conv, new.v_conv):
        conv.weight.zero_()
        conv.weight[:, -1] = 1.0
    new.b_proj.weight.zero_()
    new.a_proj.weight.zero_()
    # g = -exp(A_log) * softplus(dt_bias) with a(x) = 0: per-token decays exp(g) from 0.9 to 0.999 across heads
    decay = torch.exp(torch.linspace(math.log(0.9), math.log(0.999), heads))
    rate = -torch.log(decay)
    new.A_log.zero_()
    new.dt_bias.copy_(rate + torch.log(-torch.expm1(-rate)))  # softplus^-1(rate)


def _init_linear(new, old) -> None:
    if new.n_heads != old.n_heads or new.head_dim != old.head_dim:
        raise ConfigError(f"model.mixers.linear: a converted layer needs n_heads={old.n_heads}, head_dim="
                          f"{old.head_dim} (the attention's); got {new.n_heads}, {new.head_dim}")
    new.q_proj.weight.copy_(old.q_proj.weight)
    new.k_proj.weight.copy_(_expand_kv(old.k_proj.weight, old.n_kv_heads, old.n_heads))
    new.v_proj.weight.copy_(_expand_kv(old.v_proj.weight, old.n_kv_heads, old.n_heads))
    new.o_proj.weight.copy_(old.o_proj.weight)


def _init_swa(new, old) -> None:
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        getattr(new, name).weight.copy_(getattr(old, name).weight)


_INIT = {"gdn": _init_gdn, "linear": _init_linear, "swa": _init_swa}


@torch.no_grad()
def init_from_attention(student, teacher) -> list[int]:
    """Copy `teacher`'s weights into `student`: shared layers whole, converted layers through their mapping.
    Returns (and records on the student) the converted layer indices."""
    if len(student.layers) != len(teacher.layers):
        raise ConfigError(f"convert: the student has {len(student.layers)} layers, the teacher {len(teacher.layers)}")
    converted = []
    own = student.state_dict()
    for i, (new_layer, old_layer) in enumerate(zip(student.layers, teacher.layers)):
        if new_layer.mixer_type != old_layer.mixer_type:
            _INIT[new_layer.mixer_type](new_layer.mixer, old_layer.mixer)
            converted.append(i)
    skip = tuple(f"layers.{i}.mixer." for i in converted)
    for name, tensor in teacher.state_dict().items():
        if name.startswith(skip):
            continue
        if name not in own or own[name].shape != tensor.shape:
            raise ConfigError(f"convert: teacher weight {name} {tuple(tensor.shape)} has no counterpart in the "
                              "student; the shapes outside converted layers must match")
        own[name].copy_(tensor)
    student._converted_layers = converted
    return converted
