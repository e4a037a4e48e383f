"""Sequence mixers, one file per type, registered by name and pattern letter."""
from lctrain.models.mixers.registry import LETTERS, MIXERS, build_mixer, expand_pattern, register_mixer
from lctrain.models.mixers import attention  # noqa: F401  (registers "attn")

__all__ = ["LETTERS", "MIXERS", "build_mixer", "expand_pattern", "register_mixer"]
