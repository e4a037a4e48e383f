"""`taylor_linear_attention`: chunked PyTorch and Triton (interpreter) against the float64 token-by-token
reference, and the reference against the dense polynomial definition."""
from __future__ import annotations

import pytest
import torch

from lctrain.kernels.taylor_linear_attention import state_rows, taylor_linear_attention

# (B, T, H, D, V, initial state, normalize, packed document lengths or None)
CASES = [
    (2, 37, 2, 4, 5, True, True, None),
    (1, 100, 1, 16, 16, False, True, [1, 15, 40, 44]),
    (2, 1, 2, 3, 4, True, False, None),
    (1, 70, 2, 16, 8, True, False, [37, 0, 33]),
    # 17 <= D <= 32 runs the 32-wide Triton block (other chunks and value tiles); V + 1 > 16 spans two value
    # blocks, so the summed dq/dk partials are exercised too.
    (1, 45, 1, 24, 5, True, True, [20, 0, 25]),
    (1, 41, 1, 32, 17, True, False, [23, 18]),
    (2, 19, 1, 32, 4, False, True, None),
]


def _case_id(case):
    batch, length, heads, dim, value_dim, with_initial, normalize, docs = case
    return f"B{batch}T{length}H{heads}D{dim}V{value_dim}-h0{int(with_initial)}-norm{int(normalize)}-docs{docs}"


def _inputs(case):
    """Float64 leaves drawn in float32 (identical values for the float32 run) and cu_seqlens."""
    batch, length, heads, dim, value_dim, with_initial, _, docs = case
    num_seqs = batch if docs is None else len(docs)
    cu_seqlens = None
    if docs is not None:
        cu_seqlens = torch.tensor([0] + torch.tensor(docs).cumsum(0).tolist(), dtype=torch.int32)
    leaves = [torch.randn(batch, length, heads, dim), torch.randn(batch, length, heads, dim),
              torch.randn(batch, length, heads, value_dim)]
    # A non-negative initial state keeps the normaliser (a sum of positive scores) away from zero.
    leaves.append(torch.rand(num_seqs, heads, state_rows(dim), value_dim + 1) if with_initial else None)
    return [None if t is None else t.double() for t in leaves], cu_seqlens


def _run(backend, leaves, cu_seqlens, normalize, dtype=torch.float64):
    leaves = [None if t is None else t.detach().to(dtype).requires_grad_() for t in leaves]
    o, final = taylor_linear_attention(*leaves[:3], normalize=normalize, initial_state=leaves[3],
                                       output_final_state=True, cu_seqlens=cu_seqlens, backend=backend)
    gen = torch.Generator().manual_seed(1)
    loss = (o.double() * torch.randn(o.shape, generator=gen, dtype=torch.float64)).sum()
    loss = loss + (final.double() * torch.randn(final.shape, generator=gen, dtype=torch.float64)).sum()
    wanted = [t for t in leaves if t is not None]
    grads = torch.autograd.grad(loss, wanted)
    return [t.double() for t in (o, final, *grads)]


def _relative_error(actual, expected):
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-2)).item()


NAMES = ("o", "final_state", "dq", "dk", "dv", "dinitial_state")


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_chunk_matches_naive_in_float64(case):
    leaves, cu_seqlens = _inputs(case)
    expected = _run("naive", leaves, cu_seqlens, case[6])
    actual = _run("torch", leaves, cu_seqlens, case[6])
    for name, got, ref in zip(NAMES, actual, expected):
        assert got.shape == ref.shape, name
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10, msg=name)


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_triton_matches_naive_in_float32(case):
    leaves, cu_seqlens = _inputs(case)
    expected = _run("naive", leaves, cu_seqlens, case[6])
    actual = _run("triton", leaves, cu_seqlens, case[6], dtype=torch.float32)
    for name, got, ref in zip(NAMES, actual, expected):
        assert got.shape == ref.shape, name
        assert torch.isfinite(got).all(), name  # NaN-poisoned buffers: a skipped element shows up here
        assert _relative_error(got, ref) < 1e-4, name


def test_reference_is_the_dense_polynomial_with_default_scale():
    """o_t = sum_{s<=t} (1 + x + x^2/2) v_s / (sum_{s<=t} (1 + x + x^2/2) + eps), x = q.k / sqrt(D)."""
    q, k = torch.randn(2, 2, 19, 6, dtype=torch.float64), torch.randn(2, 2, 19, 6, dtype=torch.float64)
    v = torch.randn(2, 2, 19, 3, dtype=torch.float64)
    x = torch.einsum("bhtd,bhsd->bhts", q, k) / 6 ** 0.5
    scores = (1 + x + x * x / 2).tril()
    numerator = scores @ v
    denominator = scores.sum(-1, keepdim=True)
    layout = dict(q=q.transpose(1, 2), k=k.transpose(1, 2), v=v.transpose(1, 2))
    for backend in ("naive", "torch"):
        o, _ = taylor_linear_attention(**layout, eps=0.5, backend=backend)
        torch.testing.assert_close(o, (numerator / (denominator + 0.5)).transpose(1, 2))
        raw, _ = taylor_linear_attention(**layout, normalize=False, backend=backend)
        torch.testing.assert_close(raw, numerator.transpose(1, 2))
        half, _ = taylor_linear_attention(**layout, scale=0.5 / 6 ** 0.5, normalize=False, backend=backend)
        x_half = x / 2
        torch.testing.assert_close(half, ((1 + x_half + x_half ** 2 / 2).tril() @ v).transpose(1, 2))


def test_state_is_additive_so_splitting_a_sequence_continues_it_exactly():
    q, k, v = (torch.randn(1, 50, 2, 4, dtype=torch.float64) for _ in range(3))
    full, full_state = taylor_linear_attention(q, k, v, output_final_state=True, backend="torch")
    first, state = taylor_linear_attention(q[:, :21], k[:, :21], v[:, :21], output_final_state=True)
    second, end_state = taylor_linear_attention(q[:, 21:], k[:, 21:], v[:, 21:], initial_state=state,
                                                output_final_state=True)
    torch.testing.assert_close(torch.cat([first, second], dim=1), full, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(end_state, full_state, rtol=1e-10, atol=1e-10)
    # Summaries of disjoint pieces add up: the LASP-2 property with A = identity.
    _, tail_only = taylor_linear_attention(q[:, 21:], k[:, 21:], v[:, 21:], output_final_state=True)
    torch.testing.assert_close(state + tail_only, full_state, rtol=1e-10, atol=1e-10)
    assert full_state.shape == (1, 2, 1 + 4 + 16, 5) and full_state.dtype == torch.float64
    torch.testing.assert_close(full_state[:, :, 0, -1], torch.full((1, 2), 50.0, dtype=torch.float64))


def _good(**overrides):
    args = dict(q=torch.randn(1, 8, 2, 4), k=torch.randn(1, 8, 2, 4), v=torch.randn(1, 8, 2, 6))
    args.update(overrides)
    return args


@pytest.mark.parametrize("overrides, message", [
    (dict(q=torch.randn(8, 2, 4)), "q must be a 4-D tensor"),
    (dict(k=torch.randn(1, 8, 2, 5)), "k shape"),
    (dict(v=torch.randn(1, 7, 2, 6)), "v shape"),
    (dict(q=torch.randn(1, 8, 2, 33), k=torch.randn(1, 8, 2, 33)), "D=33 must be in"),
    (dict(v=torch.randn(1, 8, 2, 6, dtype=torch.float64)), "share one dtype"),
    (dict(initial_state=torch.zeros(1, 2, 21, 6)), r"initial_state must be \[N, H, 1 \+ D \+ D\^2, V \+ 1\]"),
    (dict(eps=-1.0), "eps must be"),
    (dict(normalize=1), "normalize must be"),
    (dict(scale="x"), "scale must be"),
    (dict(cu_seqlens=torch.tensor([0, 3, 7], dtype=torch.int32)), "end at T=8"),
    (dict(backend="cuda"), "backend='cuda'"),
])
def test_bad_input_raises_a_clear_value_error(overrides, message):
    with pytest.raises(ValueError, match=message):
        taylor_linear_attention(**_good(**overrides))


def test_triton_rejects_what_its_kernels_cannot_run():
    from lctrain.kernels.taylor_linear_attention.triton_chunk import MAX_TRITON_FEATURE_DIM, launch_config

    assert MAX_TRITON_FEATURE_DIM == 32  # the op's whole feature range
    with pytest.raises(ValueError, match="D <= 32"):
        launch_config(33, "fwd")
    with pytest.raises(ValueError, match="float64"):
        taylor_linear_attention(**{n: t.double() for n, t in _good().items()}, backend="triton")
