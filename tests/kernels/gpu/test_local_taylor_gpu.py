"""`local_attention` and `taylor_linear_attention` Triton kernels on CUDA against the chunked PyTorch path in
float64 (bf16 and fp32 inputs; fp32 dots run on TF32 tensor cores)."""
from __future__ import annotations

import pytest
import torch

from lctrain.kernels import local_attention, taylor_linear_attention

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

TOLERANCE = {torch.float32: 5e-3, torch.bfloat16: 3e-2}


def _relative_error(actual, expected):
    return ((actual.double() - expected.double()).abs().max() / expected.double().abs().max()).item()


def _run(fn, tensors, dtype):
    leaves = [t.detach().to(dtype).requires_grad_() for t in tensors]
    out = fn(*leaves)
    outputs = out if isinstance(out, tuple) else (out,)
    gen = torch.Generator(device="cuda").manual_seed(1)
    loss = sum((o.double() * torch.randn(o.shape, generator=gen, device="cuda", dtype=torch.float64)).sum()
               for o in outputs if o is not None)
    return [o for o in outputs if o is not None] + list(torch.autograd.grad(loss, leaves))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("head_dim, window, sink, packed", [(64, 128, 0, False), (128, 256, 4, True),
                                                            (64, 33, 2, True)])
def test_local_attention_triton_matches_torch(dtype, head_dim, window, sink, packed):
    torch.manual_seed(0)
    batch, length, heads, kv_heads = (1, 1500, 8, 2) if packed else (2, 1031, 4, 4)
    cu = torch.tensor([0, 1, 400, 1100, 1500], dtype=torch.int32, device="cuda") if packed else None
    q, k, v = (torch.randn(batch, length, h, head_dim, device="cuda") for h in (heads, kv_heads, kv_heads))

    def op(backend):
        return lambda q, k, v: local_attention(q, k, v, window, sink=sink, cu_seqlens=cu, backend=backend)
    expected = _run(op("torch"), (q, k, v), torch.float64)
    actual = _run(op("triton"), (q, k, v), dtype)
    for name, got, ref in zip(["o", "dq", "dk", "dv"], actual, expected):
        assert torch.isfinite(got).all(), name
        assert _relative_error(got, ref) < TOLERANCE[dtype], name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("packed", [False, True], ids=["batched", "packed"])
def test_taylor_triton_matches_torch(dtype, packed):
    torch.manual_seed(0)
    batch, length, heads, feature, value = (1, 900, 4, 16, 64) if packed else (2, 517, 4, 16, 64)
    cu = torch.tensor([0, 3, 300, 900], dtype=torch.int32, device="cuda") if packed else None
    q = torch.randn(batch, length, heads, feature, device="cuda")
    k = torch.randn(batch, length, heads, feature, device="cuda")
    v = torch.randn(batch, length, heads, value, device="cuda")

    def op(backend):
        return lambda q, k, v: taylor_linear_attention(q, k, v, cu_seqlens=cu, backend=backend,
                                                       output_final_state=True)
    expected = _run(op("torch"), (q, k, v), torch.float64)
    actual = _run(op("triton"), (q, k, v), dtype)
    for name, got, ref in zip(["o", "state", "dq", "dk", "dv"], actual, expected):
        assert torch.isfinite(got).all(), name
        assert _relative_error(got, ref) < TOLERANCE[dtype], name
