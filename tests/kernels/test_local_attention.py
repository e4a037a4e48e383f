"""`local_attention`: blocked PyTorch and Triton (interpreter) against the dense float64 reference."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lctrain.kernels.local_attention import local_attention

# (B, T, H, Hkv, D, Dv, window, sink, packed document lengths or None); list windows/sinks are per head.
CASES = [
    (2, 37, 4, 2, 16, 16, 5, 2, None),
    (1, 100, 2, 1, 32, 32, [3, 64], [0, 4], None),
    (2, 1, 2, 2, 16, 16, 4, 3, None),
    (1, 56, 2, 2, 16, 16, [1, 17], [2, 0], [1, 15, 40]),
    (1, 100, 3, 1, 16, 24, 70, 1, [37, 0, 63]),
]


def _case_id(case):
    batch, length, heads, kv_heads, dim, value_dim, window, sink, docs = case
    return f"B{batch}T{length}H{heads}kv{kv_heads}D{dim}Dv{value_dim}-w{window}-s{sink}-docs{docs}"


def _span(span):
    return torch.tensor(span, dtype=torch.int32) if isinstance(span, list) else span


def _inputs(case):
    """Float64 leaves drawn in float32 (so the float32 run sees identical values), spans and cu_seqlens."""
    batch, length, heads, kv_heads, dim, value_dim, window, sink, docs = case
    q = torch.randn(batch, length, heads, dim).double().requires_grad_()
    k = torch.randn(batch, length, kv_heads, dim).double().requires_grad_()
    v = torch.randn(batch, length, kv_heads, value_dim).double().requires_grad_()
    cu_seqlens = None
    if docs is not None:
        cu_seqlens = torch.tensor([0] + torch.tensor(docs).cumsum(0).tolist(), dtype=torch.int32)
    return (q, k, v), _span(window), _span(sink), cu_seqlens


def _run(backend, leaves, window, sink, cu_seqlens, dtype=None):
    """Output and the gradients of a random projection of it, as float64."""
    if dtype is not None:
        leaves = [t.detach().to(dtype).requires_grad_() for t in leaves]
    o = local_attention(*leaves, window, sink, cu_seqlens=cu_seqlens, backend=backend)
    weight = torch.randn(o.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grads = torch.autograd.grad((o.double() * weight).sum(), leaves)
    return [t.double() for t in (o, *grads)]


def _relative_error(actual, expected):
    # The floor matters only for gradients that are exactly zero in theory (dq of a one-token sequence),
    # where fp32 leaves ~1e-7 of rounding.
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-2)).item()


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_blocked_torch_matches_naive_in_float64(case):
    leaves, window, sink, cu_seqlens = _inputs(case)
    expected = _run("naive", leaves, window, sink, cu_seqlens)
    actual = _run("torch", leaves, window, sink, cu_seqlens)
    for name, got, ref in zip(("o", "dq", "dk", "dv"), actual, expected):
        assert got.shape == ref.shape, name
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10, msg=name)


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_triton_matches_naive_in_float32(case):
    leaves, window, sink, cu_seqlens = _inputs(case)
    expected = _run("naive", leaves, window, sink, cu_seqlens)
    actual = _run("triton", leaves, window, sink, cu_seqlens, dtype=torch.float32)
    for name, got, ref in zip(("o", "dq", "dk", "dv"), actual, expected):
        assert got.shape == ref.shape, name
        # Outputs and gradients start as NaN-filled buffers: an element a kernel skipped shows up here.
        assert torch.isfinite(got).all(), name
        assert _relative_error(got, ref) < 1e-4, name


def test_reference_semantics_full_window_is_causal_attention_and_window_one_copies_values():
    q, k, v = (torch.randn(2, 23, 4, 8, dtype=torch.float64) for _ in range(3))
    k, v = k[:, :, :2], v[:, :, :2]  # GQA: 4 query heads, 2 kv heads
    causal = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                            is_causal=True, enable_gqa=True).transpose(1, 2)
    for backend in ("naive", "torch"):
        torch.testing.assert_close(local_attention(q, k, v, window=23, backend=backend), causal)
        torch.testing.assert_close(local_attention(q, k, v, window=5, sink=23, backend=backend), causal)
        # A window of one token (no sink) attends only to itself: the output is the token's own value.
        own = local_attention(q, k, v, window=1, backend=backend)
        torch.testing.assert_close(own, v.repeat_interleave(2, dim=2))


def test_packed_documents_equal_separate_sequences_and_sinks_restart_per_document():
    lengths = [5, 40, 19]
    q, k, v = (torch.randn(1, 64, 2, 8, dtype=torch.float64) for _ in range(3))
    cu_seqlens = torch.tensor([0, 5, 45, 64], dtype=torch.int32)
    window, sink = torch.tensor([3, 9]), torch.tensor([2, 0])
    packed = local_attention(q, k, v, window, sink, cu_seqlens=cu_seqlens, backend="torch")
    start = 0
    for length in lengths:
        end = start + length
        alone = local_attention(q[:, start:end], k[:, start:end], v[:, start:end], window, sink, backend="naive")
        torch.testing.assert_close(packed[:, start:end], alone, rtol=1e-10, atol=1e-10)
        start = end


def test_default_scale_and_backend():
    q, k, v = (torch.randn(1, 30, 2, 16, dtype=torch.float64) for _ in range(3))
    auto = local_attention(q, k, v, 7, 1)
    explicit = local_attention(q, k, v, 7, 1, scale=16 ** -0.5, backend="naive")
    torch.testing.assert_close(auto, explicit, rtol=1e-10, atol=1e-10)
    sharper = local_attention(q, k, v, 7, 1, scale=2 * 16 ** -0.5, backend="torch")
    torch.testing.assert_close(sharper, local_attention(2 * q, k, v, 7, 1, backend="naive"))


def _good(**overrides):
    args = dict(q=torch.randn(1, 8, 4, 16), k=torch.randn(1, 8, 2, 16), v=torch.randn(1, 8, 2, 16), window=4)
    args.update(overrides)
    return args


@pytest.mark.parametrize("overrides, message", [
    (dict(q=torch.randn(8, 4, 16)), "q must be a 4-D tensor"),
    (dict(k=torch.randn(1, 8, 3, 16)), "Hkv dividing H"),
    (dict(k=torch.randn(1, 8, 2, 8)), "k shape"),
    (dict(v=torch.randn(1, 7, 2, 16)), "v shape"),
    (dict(v=torch.randn(1, 8, 2, 16, dtype=torch.float64)), "share one dtype"),
    (dict(window=0), "window=0 must be >= 1"),
    (dict(window=2.5), "window must be an int"),
    (dict(window=torch.tensor([4, 4])), r"window tensor must be integer \[H\] = \[4\]"),
    (dict(window=torch.tensor([4, 0, 4, 4])), "every window value must be >= 1"),
    (dict(sink=-1), "sink=-1 must be >= 0"),
    (dict(sink=torch.ones(4)), "sink tensor must be integer"),
    (dict(scale="big"), "scale must be"),
    (dict(cu_seqlens=torch.tensor([0, 3, 7], dtype=torch.int32)), "end at T=8"),
    (dict(cu_seqlens=torch.tensor([0, 6, 2, 8], dtype=torch.int32)), "non-decreasing"),
    (dict(backend="flash"), "backend='flash'"),
])
def test_bad_input_raises_a_clear_value_error(overrides, message):
    with pytest.raises(ValueError, match=message):
        local_attention(**_good(**overrides))


def test_triton_rejects_what_its_kernels_cannot_run():
    with pytest.raises(ValueError, match="D, Dv <= 128"):
        local_attention(torch.randn(1, 4, 1, 160), torch.randn(1, 4, 1, 160), torch.randn(1, 4, 1, 16), 2,
                        backend="triton")
    with pytest.raises(ValueError, match="float64"):
        local_attention(**{n: t.double() if isinstance(t, torch.Tensor) else t for n, t in _good().items()},
                        backend="triton")
