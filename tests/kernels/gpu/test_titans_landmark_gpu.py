"""titans_linear_memory Triton kernels on a real GPU: bf16/fp32 against the chunked PyTorch path in float64."""
import pytest
import torch
import torch.nn.functional as F

from lctrain.kernels.titans_memory import titans_linear_memory

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

# tf32 tensor-core dots in the sequential kernels: fp32 agrees to about 1e-3; bf16 inputs and outputs to about
# 1e-2. A bug is O(1).
TOLERANCE = {torch.float32: 1e-2, torch.bfloat16: 5e-2}


def _inputs(batch, length, heads, key_dim, value_dim, num_seqs, dtype):
    gen = torch.Generator(device="cuda").manual_seed(0)

    def draw(*shape):
        return torch.randn(*shape, generator=gen, device="cuda", dtype=torch.float32)

    q = draw(batch, length, heads, key_dim)
    k = F.normalize(draw(batch, length, heads, key_dim), dim=-1)
    v = draw(batch, length, heads, value_dim)
    alpha = torch.sigmoid(draw(batch, length, heads) - 3.0)
    eta = torch.sigmoid(draw(batch, length, heads) + 2.0)
    theta = torch.sigmoid(draw(batch, length, heads) - 1.0)
    memory, momentum = draw(num_seqs, heads, key_dim, value_dim) * 0.3, draw(num_seqs, heads, key_dim, value_dim) * 0.1
    return [x.to(dtype) for x in (q, k, v)] + [alpha, eta, theta, memory, momentum]


def _forward_backward(inputs, chunk_size, cu_seqlens, backend, weights):
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    o, (memory, momentum) = titans_linear_memory(*leaves[:6], chunk_size=chunk_size,
                                                 initial_state=(leaves[6], leaves[7]), output_final_state=True,
                                                 cu_seqlens=cu_seqlens, backend=backend)
    loss = sum((x.double() * w).sum() for x, w in zip((o, memory, momentum), weights))
    loss.backward()
    return [o.double(), memory.double(), momentum.double()] + [x.grad.double() for x in leaves]


CASES = [  # (B, T, H, K, V, chunk_size, packed document lengths or None)
    (2, 300, 4, 64, 64, 16, None),
    (1, 257, 2, 128, 128, 32, None),
    (1, 700, 2, 128, 96, 32, [1, 63, 64, 65, 500, 7]),
    (2, 129, 3, 32, 16, 7, None),
    (1, 200, 1, 16, 32, 1, [100, 0, 100]),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch,length,heads,key_dim,value_dim,chunk_size,lengths", CASES)
def test_titans_triton_matches_torch_on_cuda(dtype, batch, length, heads, key_dim, value_dim, chunk_size, lengths):
    cu_seqlens, num_seqs = None, batch
    if lengths is not None:
        cu_seqlens = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
        num_seqs = len(lengths)
    inputs = _inputs(batch, length, heads, key_dim, value_dim, num_seqs, dtype)
    gen = torch.Generator(device="cuda").manual_seed(1)
    weights = [torch.randn(shape, generator=gen, device="cuda", dtype=torch.float64)
               for shape in ((batch, length, heads, value_dim), (num_seqs, heads, key_dim, value_dim),
                             (num_seqs, heads, key_dim, value_dim))]
    reference = _forward_backward([x.double() for x in inputs], chunk_size, cu_seqlens, "torch", weights)
    got = _forward_backward(inputs, chunk_size, cu_seqlens, "triton", weights)
    names = ["o", "M", "S", "dq", "dk", "dv", "dalpha", "deta", "dtheta", "dM0", "dS0"]
    for name, actual, expected in zip(names, got, reference):
        assert torch.isfinite(actual).all(), name
        error = ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-12)).item()
        assert error < TOLERANCE[dtype], (name, error)
