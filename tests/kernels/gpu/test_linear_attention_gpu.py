"""`linear_attention` Triton kernels on CUDA against the chunked PyTorch path (bf16 and fp32)."""
from __future__ import annotations

import pytest
import torch

from lctrain.kernels.linear_attention import linear_attention

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

# fp32 dots run on TF32 tensor cores, bf16 ones round their operands: tolerances follow the precision.
TOLERANCE = {torch.float32: 5e-3, torch.bfloat16: 3e-2}


def _relative_error(actual, expected):
    return ((actual.double() - expected.double()).abs().max() / expected.double().abs().max()).item()


def _outputs_and_grads(backend, dtype, q, k, v, log_decay, initial, cu_seqlens):
    # q, k, v in the dtype under test; decay and state stay fp32 as in training.
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    leaves += [t.detach().clone().requires_grad_() for t in (log_decay, initial)]
    o, final = linear_attention(*leaves[:4], initial_state=leaves[4], output_final_state=True,
                                cu_seqlens=cu_seqlens, backend=backend)
    gen = torch.Generator(device=q.device).manual_seed(1)
    loss = (o.float() * torch.randn(o.shape, generator=gen, device=q.device)).sum()
    loss = loss + (final * torch.randn(final.shape, generator=gen, device=q.device)).sum()
    grads = torch.autograd.grad(loss, [t for t in leaves if t is not None])
    return [o, final, *grads]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("key_dim, value_dim", [(64, 64), (128, 128), (128, 256), (32, 96)])
@pytest.mark.parametrize("packed", [False, True], ids=["batched", "packed"])
def test_triton_matches_torch_on_cuda(dtype, key_dim, value_dim, packed):
    torch.manual_seed(0)
    device = "cuda"
    batch, length, heads = (1, 1000, 4) if packed else (2, 777, 4)
    cu_seqlens = torch.tensor([0, 1, 130, 600, 1000], dtype=torch.int32, device=device) if packed else None
    num_seqs = 4 if packed else batch
    q = torch.randn(batch, length, heads, key_dim, device=device)
    k = torch.randn(batch, length, heads, key_dim, device=device) / key_dim ** 0.5
    v = torch.randn(batch, length, heads, value_dim, device=device)
    log_decay = torch.nn.functional.logsigmoid(torch.randn(batch, length, heads, device=device) + 3)
    initial = torch.randn(num_seqs, heads, key_dim, value_dim, device=device)
    expected = _outputs_and_grads("torch", torch.float32, q, k, v, log_decay, initial, cu_seqlens)
    actual = _outputs_and_grads("triton", dtype, q, k, v, log_decay, initial, cu_seqlens)
    names = ["o", "final_state", "dq", "dk", "dv", "dlog_decay", "dinitial_state"]
    for name, got, ref in zip(names, actual, expected):
        assert torch.isfinite(got).all(), name
        assert _relative_error(got, ref) < TOLERANCE[dtype], name
