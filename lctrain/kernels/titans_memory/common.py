"""Helpers shared by the reference, chunked PyTorch and Triton paths of `titans_linear_memory`."""
from __future__ import annotations

from lctrain.kernels.linear_attention.common import document_spans, state_dtype_for

__all__ = ["document_spans", "state_dtype_for"]
