"""Model configuration in both directions: an lctrain model -> Hugging Face `config.json`, and a Hugging Face
`config.json` (Llama family, or an lctrain export) -> lctrain `model.*` keys.

The JSON is written by hand rather than through transformers' config classes. RoPE is described once, in
`rope_parameters` (the transformers 5 format: rope_type, factor, rope_theta). `max_position_embeddings` is the
longest input the model is known to handle: the training length times the RoPE interpolation factor of its full
attention layers; `context_limits` says the same per mixer type, null for mixers with no length limit (recurrent
state, sliding window, segment-local positions), and a model made only of those has no limit (null).
"""
from __future__ import annotations

import json
from pathlib import Path

from lctrain.config import ConfigError

LLAMA_TYPES = ("llama", "mistral")  # decoder-only, SwiGLU, RMSNorm, rotate-half RoPE, no biases
# `layer_types` uses transformers' vocabulary (it validates the entries); `mixer_types` names lctrain's mixers.
HF_LAYER_TYPES = {"attn": "full_attention", "gdn": "linear_attention", "linear": "linear_attention",
                  "swa": "sliding_attention", "based": "linear_attention", "conv": "conv",
                  "landmark": "full_attention", "titans": "hybrid"}


def is_pure_attention(layer_types: list[str]) -> bool:
    return all(t == "attn" for t in layer_types)


# Per mixer type: its resolved options, read from a built module. Except for `attn`, `gdn` and `linear` (whose
# entries the exported code reads directly) these are exactly the mixer's constructor options, so an export
# imports back through `model.mixers` unchanged; head counts come from the model-wide config.
def _attn(m) -> dict:
    return {"n_heads": m.n_heads, "n_kv_heads": m.n_kv_heads, "head_dim": m.head_dim,
            "rope_theta": float(m.rope.theta), "rope_scaling": float(m.rope.scaling)}


def _titans(m) -> dict:
    opts = {"variant": m.variant, "chunk_size": m.chunk_size, "memory_depth": m.memory_depth,
            "memory_hidden": m.mem_w1.shape[-1] if m.memory_depth == 2 else 0,
            "persistent_tokens": m.persistent.shape[0], "segment_len": m.segment_len, "window": m.window}
    if hasattr(m, "rope"):  # "mal" has no attention branch
        opts["rope_theta"] = float(m.rope.theta)
    return opts


_MIXER_OPTIONS = {
    "attn": _attn,
    "gdn": lambda m: {"n_heads": m.n_heads, "head_k_dim": m.head_k_dim, "head_v_dim": m.head_v_dim,
                      "conv_size": m.q_conv.kernel_size},
    "linear": lambda m: {"n_heads": m.n_heads, "head_dim": m.head_dim},
    "swa": lambda m: {"window": m.window, "sink": m.sink, "rope_theta": float(m.rope.theta)},
    "based": lambda m: {"n_heads": m.n_heads, "feature_dim": m.feature_dim, "head_dim": m.head_dim},
    "conv": lambda m: {"kernel_size": m.conv.kernel_size, "expand": m.in_proj.out_features // m.in_proj.in_features},
    # Exported inference reads every block (the training-time grouped softmax); retrieve_top_k is kept so the
    # export imports back into lctrain unchanged.
    "landmark": lambda m: {"block_size": m.block_size, "retrieve_top_k": m.retrieve_top_k,
                           "rope_theta": float(m.rope.theta)},
    "titans": _titans,
}


def mixer_config(model) -> dict:
    """The resolved per-type options of a built `LanguageModel` (read from the modules, so defaults and recipe
    overrides are both captured)."""
    out = {}
    for block in model.layers:
        kind = block.mixer_type
        if kind in out:
            continue
        if kind not in _MIXER_OPTIONS:
            raise ConfigError(f"export: mixer type {kind!r} has no Hugging Face modeling code yet "
                              f"(exportable: {', '.join(_MIXER_OPTIONS)})")
        out[kind] = _MIXER_OPTIONS[kind](block.mixer)
    return out


def context_limits(model, trained_length: int) -> dict:
    """Longest input per mixer type of `model`, or None where the mixer has no length limit. Full attention uses
    absolute RoPE positions: exact to the training length times its interpolation factor (what lctrain measures,
    not a guess beyond it). Landmark attention is limited like full attention without interpolation."""
    limits = {}
    for kind, opts in mixer_config(model).items():
        if kind == "attn":
            limits[kind] = int(trained_length * float(opts.get("rope_scaling", 1.0)))
        elif kind == "landmark":
            limits[kind] = int(trained_length)
        else:
            limits[kind] = None
    return limits


def max_positions(model, trained_length: int) -> int | None:
    bounded = [n for n in context_limits(model, trained_length).values() if n is not None]
    return min(bounded) if bounded else None


def _common(model, special_ids: dict, trained_length: int) -> dict:
    cfg = model.cfg
    attn = mixer_config(model).get("attn", {})
    head_dim = cfg.head_dim or cfg.d_model // cfg.n_heads
    rope_theta = attn.get("rope_theta", cfg.rope_theta)
    factor = float(attn.get("rope_scaling", 1.0))
    # Position interpolation is transformers' "linear" rope type (positions divided by the factor).
    rope = ({"rope_type": "linear", "factor": factor} if factor != 1.0 else {"rope_type": "default"})
    return {
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": model.layers[0].mlp.gate.out_features,
        "num_hidden_layers": len(model.layer_types),
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads or cfg.n_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.norm_eps,
        "rope_parameters": {**rope, "rope_theta": rope_theta},
        "max_position_embeddings": max_positions(model, trained_length),
        "tie_word_embeddings": bool(cfg.tie_embeddings),
        "initializer_range": cfg.init_std,
        "use_cache": True,
        **special_ids,
    }


def llama_config(model, special_ids: dict, trained_length: int, dtype: str) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
            **_common(model, special_ids, trained_length), "attention_bias": False, "attention_dropout": 0.0,
            "mlp_bias": False, "pretraining_tp": 1, "torch_dtype": dtype, "dtype": dtype}


def lctrain_config(model, special_ids: dict, trained_length: int, dtype: str) -> dict:
    return {"architectures": ["LctrainForCausalLM"], "model_type": "lctrain",
            "auto_map": {"AutoConfig": "configuration_lctrain.LctrainConfig",
                         "AutoModelForCausalLM": "modeling_lctrain.LctrainForCausalLM"},
            **_common(model, special_ids, trained_length),
            "trained_length": trained_length, "context_limits": context_limits(model, trained_length),
            "layer_types": [HF_LAYER_TYPES[t] for t in model.layer_types],
            "mixer_types": list(model.layer_types), "mixer_config": mixer_config(model),
            **_landmark_token(model), "torch_dtype": dtype, "dtype": dtype}


def _landmark_token(model) -> dict:
    """Models with landmark layers reserve the last vocabulary id for the landmark token (`lctrain.data.landmarks`);
    the export names it so callers can insert it."""
    return {"landmark_token_id": model.cfg.vocab_size - 1} if "landmark" in model.layer_types else {}


# --------------------------------------------------------------------------------------------- import direction
def read_hf_config(path: str | Path) -> dict:
    file = Path(path) / "config.json"
    if not file.is_file():
        raise ConfigError(f"checkpoint.init_from: no config.json in {path} (expected a Hugging Face model "
                          "directory saved with save_pretrained)")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"checkpoint.init_from: {file} is not valid JSON ({exc.msg} at line {exc.lineno})") from None


def _rope_theta(hf: dict) -> float:
    params = hf.get("rope_parameters") or {}
    return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def check_supported(hf: dict, where: str) -> None:
    """One clear line for any Llama-family feature lctrain's model does not have."""
    kind = hf.get("model_type")
    if kind == "lctrain":
        return
    if kind not in LLAMA_TYPES:
        raise ConfigError(f"{where}: model_type {kind!r} is not supported; expected a Llama-family checkpoint "
                          f"({', '.join(LLAMA_TYPES)}) or an lctrain export")
    problems = []
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        problems.append("linear-layer biases")
    if hf.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={hf['hidden_act']!r}")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", "linear", None):
        problems.append(f"rope scaling {rope.get('rope_type', rope.get('type'))!r}")
    if hf.get("sliding_window") and kind == "mistral":
        problems.append(f"sliding_window={hf['sliding_window']}")
    if hf.get("pretraining_tp", 1) not in (1, None):
        problems.append(f"pretraining_tp={hf['pretraining_tp']}")
    if problems:
        raise ConfigError(f"{where}: unsupported architecture: {', '.join(problems)} (lctrain's attention layer is "
                          "bias-free SwiGLU + RMSNorm + plain RoPE, full attention)")


def _rope_factor(hf: dict) -> float:
    """Linear RoPE scaling (position interpolation) factor of a Llama-family config; 1 when none."""
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type")) == "linear":
        return float(rope.get("factor", 1.0))
    return 1.0


def model_keys_from_hf(hf: dict) -> dict:
    """lctrain `model.*` values implied by a Hugging Face config."""
    heads = int(hf["num_attention_heads"])
    d_model = int(hf["hidden_size"])
    keys = {
        "vocab_size": int(hf["vocab_size"]),
        "d_model": d_model,
        "n_layers": int(hf["num_hidden_layers"]),
        "n_heads": heads,
        "n_kv_heads": int(hf.get("num_key_value_heads") or heads),
        "head_dim": int(hf.get("head_dim") or d_model // heads),
        "ffn_dim": int(hf["intermediate_size"]),
        "rope_theta": _rope_theta(hf),
        "norm_eps": float(hf.get("rms_norm_eps", 1e-6)),
        "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
    }
    if keys["n_kv_heads"] == heads:
        keys["n_kv_heads"] = 0  # lctrain's spelling of "no GQA"
    if keys["head_dim"] == d_model // heads:
        keys["head_dim"] = 0
    if hf.get("model_type") == "lctrain":
        keys["pattern"] = list(hf["mixer_types"])
        keys["mixers"] = _mixer_options_from_export(hf)
    else:
        keys["pattern"] = "A"
        if _rope_factor(hf) != 1.0:
            keys["mixers"] = {"attn": {"rope_scaling": _rope_factor(hf)}}
    return keys


def _mixer_options_from_export(hf: dict) -> dict:
    """`mixer_config` of an lctrain export -> `model.mixers` (only what differs from the model-wide values)."""
    mixers = {}
    for kind, opts in (hf.get("mixer_config") or {}).items():
        if kind == "attn":
            extra = {}
            if opts.get("rope_theta") is not None and float(opts["rope_theta"]) != _rope_theta(hf):
                extra["rope_theta"] = float(opts["rope_theta"])
            if float(opts.get("rope_scaling", 1.0)) != 1.0:
                extra["rope_scaling"] = float(opts["rope_scaling"])
        else:
            extra = dict(opts)
        if extra:
            mixers[kind] = extra
    return mixers
