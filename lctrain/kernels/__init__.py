"""Long-context sequence-mixing ops.

Every op takes `[B, T, H, D]` tensors, `initial_state=None, output_final_state=False, cu_seqlens=None,
backend=None` where it carries state, and dispatches to a Triton kernel on CUDA or a chunked PyTorch path on
CPU (`backend="naive"` gives the float64-capable token-by-token reference). See each op's docstring.
"""
from lctrain.kernels.linear_attention import linear_attention
from lctrain.kernels.gated_delta_rule import gated_delta_rule
from lctrain.kernels.local_attention import local_attention
from lctrain.kernels.attention import attention
from lctrain.kernels.taylor_linear_attention import taylor_linear_attention
from lctrain.kernels.landmark_attention import landmark_attention
from lctrain.kernels.titans_memory import titans_linear_memory

__all__ = ["attention", "linear_attention", "gated_delta_rule", "landmark_attention", "titans_linear_memory",
           "local_attention", "taylor_linear_attention"]
