"""Building blocks shared by the mixers of an lctrain export: RMSNorm, SwiGLU MLP, rotary embedding, causal
short convolution with a decoding cache."""
import torch
import torch.nn as nn
import torch.nn.functional as F


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.to(torch.promote_types(x.dtype, torch.float32))  # at least fp32; fp64 stays fp64, as in lctrain
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.to(xf.dtype)).to(x.dtype)


class MLP(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def rotate(x, position_ids, theta, scaling=1.0):
    """Rotary embedding, rotate-half layout: angles in fp32, the rotation in fp32 (fp64 for fp64 x), as lctrain.
    x [B, T, H, D], position_ids [B, T]."""
    dim = x.shape[-1]
    inv_freq = (1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))).float().to(x.device)
    freqs = (position_ids.float() / scaling)[..., None] * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)[:, :, None, :]
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    half = dim // 2
    rotated = torch.cat([-xf[..., half:], xf[..., :half]], dim=-1)
    return (xf * emb.cos() + rotated * emb.sin()).to(x.dtype)


class ShortConvolution(nn.Module):
    """Causal depthwise convolution (+ SiLU unless `activation=False`); weight [C, k], weight[:, -1] multiplies
    the current token. With a cache entry it continues from the k - 1 inputs stored under `key`."""

    def __init__(self, channels, kernel_size, activation=True):
        super().__init__()
        self.kernel_size = kernel_size
        self.activation = activation
        self.weight = nn.Parameter(torch.zeros(channels, kernel_size))

    def forward(self, x, entry, key, valid=None):
        """x [B, T, C]; valid [B, T] bool or None (False: padding, neither read nor stored)."""
        k = self.kernel_size
        prefix = entry.get(key) if entry is not None else None
        if prefix is None:
            prefix = x.new_zeros(x.shape[0], k - 1, x.shape[2])
        order = None
        if valid is not None:
            # Real tokens first, in order, padding after them: a token then reads the real inputs before it.
            order = torch.sort((~valid).to(torch.uint8), dim=1, stable=True).indices
            x = x.gather(1, order[..., None].expand_as(x)) * valid.gather(1, order)[..., None].to(x.dtype)
        padded = torch.cat([prefix.to(x.dtype), x], dim=1)
        if entry is not None:  # the last k - 1 real inputs (none when k == 1)
            if valid is None:
                entry[key] = padded[:, padded.shape[1] - (k - 1):].detach()
            else:
                last = valid.sum(dim=1)[:, None] + torch.arange(k - 1, device=x.device)
                entry[key] = padded.gather(1, last[..., None].expand(-1, -1, x.shape[2])).detach()
        out = x * self.weight[:, -1]
        for shift in range(1, k):
            out = out + padded[:, k - 1 - shift:k - 1 - shift + x.shape[1]] * self.weight[:, -1 - shift]
        if order is not None:  # back to the input order
            out = out.gather(1, order.argsort(dim=1)[..., None].expand_as(out))
        return F.silu(out) if self.activation else out
