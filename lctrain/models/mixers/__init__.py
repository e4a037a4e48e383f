"""Sequence mixers, one file per type, registered by name and pattern letter."""
from lctrain.models.mixers.registry import LETTERS, MIXERS, build_mixer, expand_pattern, register_mixer
from lctrain.models.mixers import attention  # noqa: F401  (A: attn)
from lctrain.models.mixers import gated_deltanet  # noqa: F401  (G: gdn)
from lctrain.models.mixers import linear_attention  # noqa: F401  (L: linear)
from lctrain.models.mixers import sliding_window  # noqa: F401  (S: swa)
from lctrain.models.mixers import based  # noqa: F401  (B: based)
from lctrain.models.mixers import gated_conv  # noqa: F401  (C: conv)
from lctrain.models.mixers import landmark  # noqa: F401  (M: landmark)
from lctrain.models.mixers import titans  # noqa: F401  (T: titans)

__all__ = ["LETTERS", "MIXERS", "build_mixer", "expand_pattern", "register_mixer"]
