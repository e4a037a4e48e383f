"""flash-attn (optional extra) behind the `attention` contract: varlen, causal, optional uniform sliding window,
plain form only (no block offsets, no sinks). Used on CUDA in fp16/bf16 when installed; its own autograd."""
from __future__ import annotations

import torch

try:  # pragma: no cover - depends on the environment
    from flash_attn import flash_attn_varlen_func
except Exception:  # pragma: no cover
    flash_attn_varlen_func = None


def flash_available() -> bool:
    return flash_attn_varlen_func is not None


def flash_supports(q: torch.Tensor, windows: tuple[int, ...], sinks: tuple[int, ...], q_offset: int,
                   k_offset: int, tk: int, causal: bool) -> bool:
    """Whether a call fits flash-attn: CUDA fp16/bf16, plain causal form, no sinks, one window for all heads."""
    return (flash_available() and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and causal
            and q_offset == 0 and k_offset == 0 and q.shape[1] == tk and not any(sinks)
            and len(set(windows)) <= 1)


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, cu_seqlens: torch.Tensor,
                    max_len: int, window: int | None, return_lse: bool):  # pragma: no cover - needs CUDA
    """q `[1, T, H, D]` (packed, `cu_seqlens` int32 on the device, `max_len` from the host) -> o, lse `[1, H, T]`."""
    batch, length, heads, dim = q.shape
    window_size = (-1, -1) if window is None else (window - 1, 0)
    out = flash_attn_varlen_func(q.reshape(batch * length, heads, dim), k.reshape(batch * length, -1, dim),
                                 v.reshape(batch * length, -1, v.shape[-1]), cu_seqlens, cu_seqlens, max_len,
                                 max_len, softmax_scale=scale, causal=True, window_size=window_size,
                                 return_attn_probs=return_lse)
    if not return_lse:
        return out.reshape(batch, length, heads, -1), None
    o, lse = out[0], out[1]                          # varlen lse: [H, total]
    return o.reshape(batch, length, heads, -1), lse.reshape(heads, batch, length).transpose(0, 1)
