"""The `attn` mixer through its one entry point (`lctrain.models.attend`): exact against a dense float64
reference on packed documents with GQA, no `[T, T]` tensor in a forward + backward, the backend option, and no
import of `lctrain.eval` from the models."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lctrain.config import ConfigError, load_config
from lctrain.models import BatchContext
from lctrain.models.mixers.attention import Attention
from lctrain.models.mixers.qkv import rotated_qkv


def _mixer(**over):
    overrides = ["model.d_model=32", "model.n_heads=4", "model.n_kv_heads=2"] + [f"model.{k}={v}"
                                                                              for k, v in over.items()]
    torch.manual_seed(0)
    return Attention(load_config(None, overrides).model, 0).double()


def _dense(mixer, x, positions):
    """Float64 dense reference: causal softmax within documents, GQA by repetition."""
    q, k, v = rotated_qkv(mixer, x, BatchContext(positions))
    group = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
    docs = torch.cumsum((positions == 0).long(), dim=1)
    index = torch.arange(x.shape[1])
    mask = (docs[:, :, None] == docs[:, None, :]) & (index[None, None, :] <= index[None, :, None])
    scores = torch.einsum("bihd,bjhd->bhij", q, k) * mixer.scale
    o = torch.einsum("bhij,bjhd->bihd", scores.masked_fill(~mask[:, None], float("-inf")).softmax(-1), v)
    return mixer.o_proj(o.reshape(x.shape[0], x.shape[1], -1))


@pytest.mark.parametrize("positions", [
    torch.cat([torch.arange(9), torch.arange(1), torch.arange(27)]).expand(2, 37),   # packed, a 1-token document
    torch.arange(37).expand(3, 37),                                                  # one document per row
])
def test_mixer_equals_dense_reference_with_gradients(positions):
    mixer = _mixer()
    x = torch.randn(positions.shape[0], positions.shape[1], 32, dtype=torch.float64, requires_grad=True)
    out = mixer(x, BatchContext.from_positions(positions))
    ref = _dense(mixer, x, positions)
    assert torch.allclose(out, ref, atol=1e-12)
    w = torch.randn_like(out)
    got = torch.autograd.grad((out * w).sum(), [x] + list(mixer.parameters()))
    want = torch.autograd.grad((ref * w).sum(), [x] + list(mixer.parameters()))
    for a, b in zip(got, want):
        assert torch.allclose(a, b, atol=1e-10)


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


def test_no_dense_mask_in_the_mixer():
    """Around the op (whose own memory is tested in tests/kernels) the mixer builds nothing of T x T size."""
    length = 512
    mixer = _mixer().float()
    positions = (torch.arange(length) % 128)[None]
    x = torch.randn(1, length, 32, requires_grad=True)
    ctx = BatchContext.from_positions(positions)
    with _Largest() as mode:
        mixer(x, ctx).sum().backward()
    assert mode.numel < length * length // 4, mode.numel


def test_attn_backend_option():
    assert _mixer(attn_backend="torch").backend == "torch"
    assert _mixer(attn_backend="auto").backend is None
    with pytest.raises(ConfigError, match="attn_backend"):
        _mixer(attn_backend="sdpa")


def test_models_do_not_import_eval():
    code = ("import sys, lctrain.models.mixers.attention, lctrain.models.h2o, lctrain.models.kv_cache; "
            "print(sorted(m for m in sys.modules if m.startswith('lctrain.eval')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
