"""Put a MoA plan on an already built model (evaluation of a plan, or of a uniform baseline, on a run)."""
from __future__ import annotations

from lctrain.config import ConfigError


def set_attn_plan(lm, path: str | None, where: str = "--attn-plan") -> None:
    """Every `attn` layer of `lm` (a LanguageModel) takes its heads' rules from the plan file (None: dense); the
    file is read once. Errors are ConfigErrors prefixed by `where`."""
    from lctrain.models.mixers.attention import Attention
    from lctrain.moa.plan import load_plan

    plan = None
    if path:
        try:
            plan = load_plan(path, n_layers=len(lm.layer_types), n_heads=lm.cfg.n_heads)
        except ValueError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        attn_layers = {str(i) for i, t in enumerate(lm.layer_types) if t == "attn"}
        stray = sorted(set(plan["layers"]) - attn_layers, key=int)
        if stray:
            raise ConfigError(f"{where}: {path} has rules for layers {stray}, which are not attention layers "
                              f"of this model (attention layers: {sorted(attn_layers, key=int)})")
    for layer in lm.layers:
        if isinstance(layer.mixer, Attention):
            layer.mixer.set_plan(plan)
