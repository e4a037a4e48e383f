"""Models: a decoder LM built from a layer pattern of registered mixers."""
from lctrain.models.context import BatchContext, cu_seqlens_from_positions
from lctrain.models.lm import LanguageModel, LMOutput

__all__ = ["BatchContext", "LanguageModel", "LMOutput", "cu_seqlens_from_positions"]
