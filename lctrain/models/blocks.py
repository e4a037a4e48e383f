"""Building blocks shared by every model: RMSNorm, SwiGLU MLP, rotary position embedding."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class _RMSNormFn(torch.autograd.Function):
    """The forward's own arithmetic, saving only x and the per-row 1/rms; the backward in closed form,
    dx = rstd * (g w - x_hat * mean(g w x_hat)), dw = sum over rows of g x_hat (fewer passes than autograd's)."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        xf = x.to(torch.promote_types(x.dtype, torch.float32))  # at least fp32; fp64 stays fp64
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        return (xf * rstd * weight.to(xf.dtype)).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x, weight, rstd = ctx.saved_tensors
        xf = x.to(rstd.dtype)
        g = grad.to(rstd.dtype)
        x_hat = xf * rstd
        grad_x = grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = (g * x_hat).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
        if ctx.needs_input_grad[0]:
            g_hat = g * weight.to(rstd.dtype)
            mean = (g_hat * x_hat).mean(-1, keepdim=True)
            grad_x = torch.addcmul(g_hat, x_hat, mean, value=-1).mul_(rstd).to(x.dtype)
        return grad_x, grad_w, None


class RMSNorm(nn.Module):
    """y = x / rms(x) * weight, computed in fp32 for stability under bf16 autocast."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _RMSNormFn.apply(x, self.weight, self.eps)


class _SiLUMulFn(torch.autograd.Function):
    """silu(a) * b keeping only a and b for backward (autograd would also keep silu(a): one [tokens, ffn] tensor
    more per layer) and recomputing silu(a) there; the arithmetic is autograd's, so results are bit-identical."""

    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return F.silu(a).mul_(b)

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved_tensors
        d_a = torch.ops.aten.silu_backward(grad * b, a) if ctx.needs_input_grad[0] else None
        d_b = F.silu(a).mul_(grad) if ctx.needs_input_grad[1] else None
        return d_a, d_b


class SwiGLU(nn.Module):
    """MLP with a SiLU-gated linear unit: down(silu(gate(x)) * up(x))."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)
        self.down._is_residual_out = True  # scaled init: the last projection of a residual branch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(_SiLUMulFn.apply(self.gate(x), self.up(x)))


def default_ffn_dim(d_model: int, multiple_of: int = 64) -> int:
    hidden = int(8 * d_model / 3)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding in the "rotate half" layout used by Llama checkpoints (so exports and imports
    map weights one to one). Positions come from the batch, so they reset at packed-document starts."""

    def __init__(self, head_dim: int, theta: float = 10000.0, scaling: float = 1.0):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"rotary embedding needs an even head_dim, got {head_dim}")
        self.head_dim = head_dim
        self.theta = theta
        self.scaling = scaling  # position interpolation factor (> 1 stretches positions for context extension)
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)

    def cos_sin(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids [B, T] -> cos, sin [B, T, 1, head_dim] in fp32."""
        pos = position_ids.float() / self.scaling
        freqs = pos[..., None] * self.inv_freq.to(pos.device)
        emb = torch.cat([freqs, freqs], dim=-1)[:, :, None, :]
        return emb.cos(), emb.sin()

    @staticmethod
    def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [B, T, H, D] rotated by its positions; computed in fp32 (fp64 for fp64 x), returned in x's dtype."""
        return _Rotate.apply(x, cos, sin)


def _rotate_half_add_(out: torch.Tensor, x: torch.Tensor, sin: torch.Tensor, sign: float) -> torch.Tensor:
    """out += sign * rotate_half(x) * sin in place, rotate_half(x) = [-x2, x1] (sign -1: its transpose, for the
    backward), without building the rotated copy."""
    half = x.shape[-1] // 2
    out[..., :half].addcmul_(x[..., half:], sin[..., :half], value=-sign)
    out[..., half:].addcmul_(x[..., :half], sin[..., half:], value=sign)
    return out


class _Rotate(torch.autograd.Function):
    """x * cos + rotate_half(x) * sin; the backward is the inverse rotation of the gradient (a rotation's
    transpose), so only cos and sin are saved."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        ctx.save_for_backward(cos, sin)
        ctx.dtype = x.dtype
        return _rotate_half_add_(xf * cos, xf, sin, 1.0).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        g = grad.to(torch.promote_types(grad.dtype, torch.float32))
        return _rotate_half_add_(g * cos, g, sin, -1.0).to(ctx.dtype), None, None
