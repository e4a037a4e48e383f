"""Mixer registry: a layer type name (and its one-letter code for patterns) -> nn.Module class.

Adding a mixer is one file under `lctrain/models/mixers/` decorated with `@register_mixer("name", "X")` plus an import
line in `lctrain/models/mixers/__init__.py`.
"""
from __future__ import annotations

import difflib
import inspect
from typing import Callable

from lctrain.config import ConfigError

MIXERS: dict[str, type] = {}
LETTERS: dict[str, str] = {}


def register_mixer(name: str, letter: str) -> Callable[[type], type]:
    def wrap(cls: type) -> type:
        if name in MIXERS or letter in LETTERS:
            raise ValueError(f"mixer {name!r} / letter {letter!r} registered twice")
        MIXERS[name] = cls
        LETTERS[letter] = name
        cls.mixer_type = name
        return cls
    return wrap


def expand_pattern(pattern, n_layers: int) -> list[str]:
    """`"GGGA"` repeated to n_layers, or an explicit list of names (length must equal n_layers, or divide it and
    repeat). Returns one registry name per layer."""
    if isinstance(pattern, str):
        unknown = sorted({c for c in pattern if c not in LETTERS})
        if unknown:
            known = ", ".join(f"{k}={v}" for k, v in sorted(LETTERS.items()))
            raise ConfigError(f"model.pattern: unknown layer letter(s) {''.join(unknown)!r} in {pattern!r}; known: {known}")
        names = [LETTERS[c] for c in pattern]
    else:
        unknown = [p for p in pattern if p not in MIXERS]
        if unknown:
            raise ConfigError(f"model.pattern: unknown mixer type(s) {unknown}; known: {', '.join(sorted(MIXERS))}")
        names = list(pattern)
    if n_layers % len(names):
        raise ConfigError(f"model.pattern: length {len(names)} does not divide model.n_layers={n_layers}")
    return names * (n_layers // len(names))


def mixer_options(model_cfg, name: str) -> dict:
    opts = model_cfg.mixers.get(name, {}) or {}
    if not isinstance(opts, dict):
        raise ConfigError(f"model.mixers.{name}: expected a mapping of options, got {opts!r}")
    return dict(opts)


def build_mixer(name: str, model_cfg, layer_idx: int):
    """Instantiate mixer `name` for layer `layer_idx` with its `model.mixers.<name>` options checked by name."""
    cls = MIXERS[name]
    opts = mixer_options(model_cfg, name)
    params = inspect.signature(cls.__init__).parameters
    allowed = [p for p in params if p not in ("self", "model_cfg", "layer_idx")]
    for key in opts:
        if key not in allowed:
            close = difflib.get_close_matches(key, allowed, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"model.mixers.{name}.{key}: unknown option{hint} (known: {', '.join(allowed)})")
    return cls(model_cfg, layer_idx, **opts)
