"""gated_delta_rule Triton kernels on a real GPU: bf16/fp16/fp32 against the chunked PyTorch path in float64 on the
same (rounded) inputs."""
import pytest
import torch
import torch.nn.functional as F

from lctrain.kernels.gated_delta_rule import gated_delta_rule

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

# Relative error (norm of the difference over the reference's norm) of every output and gradient. fp32: tf32
# tensor-core dots, about 1e-3. bf16/fp16: products of bf16/fp16 tiles with fp32 accumulation, the per-chunk tensors
# (states, A, Aqk, W, delta) stored in the input type and o and the input gradients rounded to it, about 1e-2
# (each bf16 rounding is 2^-9 relative). A bug is O(1).
TOLERANCE = {torch.float32: 1e-2, torch.bfloat16: 5e-2, torch.float16: 5e-2}


def make_inputs(batch, seq_len, heads, key_dim, value_dim, num_seqs, dtype):
    gen = torch.Generator(device="cuda").manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device="cuda", dtype=torch.float32)

    q = randn(batch, seq_len, heads, key_dim)
    k = F.normalize(randn(batch, seq_len, heads, key_dim), dim=-1)
    v = randn(batch, seq_len, heads, value_dim)
    g = F.logsigmoid(randn(batch, seq_len, heads) + 2.0)
    beta = torch.sigmoid(randn(batch, seq_len, heads))
    state = randn(num_seqs, heads, key_dim, value_dim)
    return [x.to(dtype) for x in (q, k, v)] + [g, beta, state]


def forward_backward(inputs, cu_seqlens, backend, d_out, d_final):
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    o, final = gated_delta_rule(*leaves[:5], initial_state=leaves[5], output_final_state=True,
                                cu_seqlens=cu_seqlens, backend=backend)
    ((o.double() * d_out).sum() + (final.double() * d_final).sum()).backward()
    return [o.double(), final.double()] + [x.grad.double() for x in leaves]


CASES = [
    (2, 300, 4, 64, 64, None),
    (1, 513, 2, 128, 256, None),
    (1, 700, 2, 128, 128, [1, 63, 64, 65, 500, 7]),
    (2, 129, 3, 32, 16, None),
    (1, 200, 1, 16, 32, [100, 0, 100]),
    (1, 8192, 4, 128, 256, None),  # the recipes' GDN heads, 128 chunks: errors must not grow along the sequence
    (1, 4096, 4, 128, 128, [1, 63, 64, 65, 1000, 2903]),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("batch,seq_len,heads,key_dim,value_dim,lengths", CASES)
def test_triton_matches_torch_on_cuda(dtype, batch, seq_len, heads, key_dim, value_dim, lengths):
    cu_seqlens = None
    num_seqs = batch
    if lengths is not None:
        cu_seqlens = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
        num_seqs = len(lengths)
    inputs = make_inputs(batch, seq_len, heads, key_dim, value_dim, num_seqs, dtype)
    gen = torch.Generator(device="cuda").manual_seed(1)
    d_out = torch.randn(batch, seq_len, heads, value_dim, generator=gen, device="cuda", dtype=torch.float64)
    d_final = torch.randn(num_seqs, heads, key_dim, value_dim, generator=gen, device="cuda", dtype=torch.float64)
    reference = forward_backward([x.double() for x in inputs], cu_seqlens, "torch", d_out, d_final)
    got = forward_backward(inputs, cu_seqlens, "triton", d_out, d_final)
    assert got[0].dtype == torch.float64  # compared in float64; o itself is returned in q's dtype
    names = ["o", "final_state", "dq", "dk", "dv", "dg", "dbeta", "d_initial_state"]
    for name, a, b in zip(names, got, reference):
        assert torch.isfinite(a).all(), f"{name} has non-finite values"
        err = ((a - b).norm() / b.norm()).item()
        assert err < TOLERANCE[dtype], f"{name}: relative error {err:.3e} ({dtype})"


def test_auto_backend_is_triton_on_cuda():
    q, k, v, g, beta, _ = make_inputs(1, 64, 1, 64, 64, 1, torch.bfloat16)
    o_auto, _ = gated_delta_rule(q, k, v, g, beta)
    o_triton, _ = gated_delta_rule(q, k, v, g, beta, backend="triton")
    assert o_auto.dtype == torch.bfloat16
    torch.testing.assert_close(o_auto, o_triton, rtol=0, atol=0)
