"""Memory of the attention op's torch path is linear in T: no tensor it creates (forward or backward) grows with
T^2. Every tensor produced inside the blockwise forward and backward is recorded with a dispatch mode; the
largest one must stay far below T x T and grow at most linearly from T to 2T."""
from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lctrain.kernels.attention import blockwise
from lctrain.kernels.attention.pattern import Pattern


class _Largest(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out


def _largest_tensor(length: int, heads: int = 1, dim: int = 4, docs: int = 2) -> int:
    q, k, v = (torch.randn(1, length, heads, dim) for _ in range(3))
    offsets = tuple(range(0, length + 1, length // docs))
    cu = torch.tensor(offsets, dtype=torch.int32)
    pattern = Pattern(True, (), (), dim ** -0.5, offsets=offsets)
    with _Largest() as mode:
        o, lse = blockwise.blockwise_forward(q, k, v, pattern, cu)
        blockwise.blockwise_backward(q, k, v, o, lse, torch.randn_like(o), None, pattern, cu)
    return mode.numel


def test_no_tensor_grows_with_t_squared():
    small, large = _largest_tensor(1024), _largest_tensor(2048)
    # one [H, Q_BLOCK, K_BLOCK] score tile (128 x 512 per head) or q/k/v themselves, never [T, T]
    assert large < 2048 * 2048 // 8, large
    assert large <= 2 * small, (small, large)
