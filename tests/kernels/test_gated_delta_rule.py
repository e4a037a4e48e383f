"""gated_delta_rule: chunked torch and Triton (interpreter) against the token-by-token float64 reference."""
import pytest
import torch
import torch.nn.functional as F

from lctrain.kernels.gated_delta_rule import gated_delta_rule
from lctrain.kernels.gated_delta_rule import triton_chunk


def make_inputs(batch, seq_len, heads, key_dim, value_dim, num_seqs=None, dtype=torch.float64, seed=0):
    """Random q, k (L2-normalised), v, g (<= 0), beta in (0, 1) and an initial state [N, H, K, V]."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    q = randn(batch, seq_len, heads, key_dim)
    k = F.normalize(randn(batch, seq_len, heads, key_dim), dim=-1)
    v = randn(batch, seq_len, heads, value_dim)
    g = F.logsigmoid(randn(batch, seq_len, heads) + 2.0)  # mostly mild decay, some strong
    beta = torch.sigmoid(randn(batch, seq_len, heads))
    state = randn(num_seqs or batch, heads, key_dim, value_dim)
    return [x.to(dtype) for x in (q, k, v, g, beta, state)]


def run_with_grads(inputs, cotangents, cu_seqlens, backend):
    """Forward with initial state in and final state out, backward with fixed cotangents.

    Returns [o, final_state, dq, dk, dv, dg, dbeta, d_initial_state] as float64.
    """
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    q, k, v, g, beta, state = leaves
    o, final = gated_delta_rule(q, k, v, g, beta, initial_state=state, output_final_state=True,
                                cu_seqlens=cu_seqlens, backend=backend)
    d_out, d_final = cotangents
    ((o.double() * d_out).sum() + (final.double() * d_final).sum()).backward()
    return [o.detach().double(), final.detach().double()] + [x.grad.double() for x in leaves]


NAMES = ["o", "final_state", "dq", "dk", "dv", "dg", "dbeta", "d_initial_state"]


def assert_close_rel(got, want, tol):
    for name, a, b in zip(NAMES, got, want):
        assert torch.isfinite(a).all(), f"{name} has non-finite values"
        err = ((a - b).norm() / b.norm().clamp_min(1e-30)).item()
        assert err < tol, f"{name}: relative error {err:.3e} > {tol}"


def cotangents_for(inputs, cu_seqlens, seed=1):
    gen = torch.Generator().manual_seed(seed)
    q, _, v, _, _, state = inputs
    d_out = torch.randn(*v.shape, generator=gen, dtype=torch.float64)
    d_final = torch.randn(*state.shape, generator=gen, dtype=torch.float64)
    return d_out, d_final


# (B, T, H, K, V, document lengths or None)
CHUNK_CASES = [
    (2, 100, 3, 16, 32, None),
    (1, 130, 1, 32, 16, None),
    (1, 180, 2, 16, 16, [1, 15, 64, 100]),
    (1, 80, 1, 16, 32, [0, 80, 0]),  # empty documents keep their initial state
]


def doc_offsets(lengths):
    if lengths is None:
        return None
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)


@pytest.mark.parametrize("batch,seq_len,heads,key_dim,value_dim,lengths", CHUNK_CASES)
def test_chunk_matches_naive_float64(batch, seq_len, heads, key_dim, value_dim, lengths):
    cu_seqlens = doc_offsets(lengths)
    inputs = make_inputs(batch, seq_len, heads, key_dim, value_dim, num_seqs=len(lengths) if lengths else None)
    cotangents = cotangents_for(inputs, cu_seqlens)
    want = run_with_grads(inputs, cotangents, cu_seqlens, "naive")
    got = run_with_grads(inputs, cotangents, cu_seqlens, "torch")
    assert_close_rel(got, want, 1e-10)


@pytest.fixture
def poisoned_buffers(monkeypatch):
    """Every Triton output and intermediate starts as NaN, so an element a kernel forgets to write shows up."""
    def nan_buffer(shape, dtype, device):
        return torch.full(tuple(shape), float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(triton_chunk, "new_buffer", nan_buffer)


TRITON_CASES = [
    (1, 1, 1, 16, 16, None),
    (2, 37, 3, 32, 16, None),
    (1, 130, 1, 16, 64, None),
    (2, 100, 1, 64, 32, None),
    (1, 180, 3, 16, 32, [1, 15, 64, 100]),
    (1, 80, 1, 32, 16, [0, 37, 0, 43]),  # empty documents keep their initial state
]


@pytest.mark.parametrize("batch,seq_len,heads,key_dim,value_dim,lengths", TRITON_CASES)
def test_triton_matches_naive(poisoned_buffers, batch, seq_len, heads, key_dim, value_dim, lengths):
    check_triton_against_naive(batch, seq_len, heads, key_dim, value_dim, lengths)


def check_triton_against_naive(batch, seq_len, heads, key_dim, value_dim, lengths) -> None:
    """Outputs, final states and every gradient of the Triton op (fp32 inputs) against the float64 recurrence."""
    cu_seqlens = doc_offsets(lengths)
    inputs = make_inputs(batch, seq_len, heads, key_dim, value_dim, num_seqs=len(lengths) if lengths else None)
    cotangents = cotangents_for(inputs, cu_seqlens)
    want = run_with_grads(inputs, cotangents, cu_seqlens, "naive")
    got = run_with_grads([x.float() for x in inputs], cotangents, cu_seqlens, "triton")
    assert_close_rel(got, want, 1e-4)


def test_triton_without_states(poisoned_buffers):
    """No initial state in, no final state out: the kernels' optional-state branches switched off."""
    q, k, v, g, beta, _ = make_inputs(1, 70, 2, 16, 32)
    o_ref, _ = gated_delta_rule(q, k, v, g, beta, backend="naive")
    leaves = [x.float().requires_grad_() for x in (q, k, v, g, beta)]
    o, final = gated_delta_rule(*leaves, backend="triton")
    assert final is None and o.dtype == torch.float32
    assert ((o.double() - o_ref).norm() / o_ref.norm()) < 1e-4
    o.sum().backward()
    ref_leaves = [x.clone().requires_grad_() for x in (q, k, v, g, beta)]
    gated_delta_rule(*ref_leaves, backend="naive")[0].sum().backward()
    for name, a, b in zip("qkvgb", leaves, ref_leaves):
        assert ((a.grad.double() - b.grad).norm() / b.grad.norm()) < 1e-4, name


@pytest.mark.parametrize("backend", ["naive", "torch", "triton"])
def test_single_token_closed_form(backend):
    """T = 1: S_1 = e^g (S_0 - beta k k^T S_0) + beta k v^T and o = scale q^T S_1, with k not normalised
    (the op must use q and k as given)."""
    q, k, v, g, beta, state = make_inputs(2, 1, 2, 16, 16, dtype=torch.float32)
    k = 3.0 * k
    scale = 0.7
    kb, qb, vb = k[:, 0], q[:, 0], v[:, 0]  # [B, H, D]
    removed = torch.einsum("bhk,bhkv->bhv", kb, state)
    want_state = torch.exp(g[:, 0])[..., None, None] * (
        state - beta[:, 0, :, None, None] * kb[..., :, None] * removed[..., None, :])
    want_state = want_state + beta[:, 0, :, None, None] * kb[..., :, None] * vb[..., None, :]
    want_o = scale * torch.einsum("bhk,bhkv->bhv", qb, want_state)
    o, final = gated_delta_rule(q, k, v, g, beta, scale=scale, initial_state=state, output_final_state=True,
                                backend=backend)
    torch.testing.assert_close(final, want_state, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(o[:, 0], want_o, rtol=1e-5, atol=1e-5)


def test_packed_documents_equal_separate_runs():
    lengths = [5, 40, 19]
    q, k, v, g, beta, state = make_inputs(1, sum(lengths), 2, 16, 32, num_seqs=3)
    o, final = gated_delta_rule(q, k, v, g, beta, initial_state=state, output_final_state=True,
                                cu_seqlens=doc_offsets(lengths))
    start = 0
    for n, length in enumerate(lengths):
        span = slice(start, start + length)
        o_n, final_n = gated_delta_rule(q[:, span], k[:, span], v[:, span], g[:, span], beta[:, span],
                                        initial_state=state[n:n + 1], output_final_state=True)
        torch.testing.assert_close(o[:, span], o_n, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(final[n:n + 1], final_n, rtol=1e-12, atol=1e-12)
        start += length


def test_defaults_and_dtypes():
    q, k, v, g, beta, _ = make_inputs(1, 9, 1, 16, 16, dtype=torch.float32)
    o_default, final = gated_delta_rule(q, k, v, g, beta)
    assert final is None
    o_scaled, _ = gated_delta_rule(q, k, v, g, beta, scale=16 ** -0.5)
    torch.testing.assert_close(o_default, o_scaled)
    half = [x.to(torch.bfloat16) for x in (q, k, v, g, beta)]
    o_half, final_half = gated_delta_rule(*half, output_final_state=True)
    assert o_half.dtype == torch.bfloat16 and final_half.dtype == torch.float32
    assert final_half.shape == (1, 1, 16, 16)


def _bad_input_cases():
    q, k, v, g, beta, state = make_inputs(2, 8, 2, 16, 32, dtype=torch.float32)
    ok = dict(q=q, k=k, v=v, g=g, beta=beta)
    one = {name: x[:1] for name, x in ok.items()}
    return [
        (dict(ok, q=q[..., :8]), "k must have q's shape"),
        (dict(ok, v=v[:, :4]), "v must be"),
        (dict(ok, g=g[..., None]), "g must be"),
        (dict(ok, beta=beta[:, :3]), "beta must be"),
        (dict(ok, q=q[0]), "q must be"),
        (dict(ok, k=k.to(torch.int64)), "k must be floating point"),
        (dict(ok, initial_state=state[:1]), "initial_state must be"),
        (dict(ok, backend="cuda"), "backend='cuda'"),
        (dict(ok, scale="big"), "scale must be"),
        (dict(ok, cu_seqlens=torch.tensor([0, 8, 16], dtype=torch.int32)), "batch size 1"),
        (dict(one, cu_seqlens=torch.tensor([0, 9], dtype=torch.int32)), "end at T=8"),
        (dict(one, cu_seqlens=torch.tensor([0, 6, 3, 8], dtype=torch.int32)), "non-decreasing"),
        (dict(one, cu_seqlens=torch.tensor([0.0, 8.0])), "cu_seqlens must be an int32/int64"),
        (dict(ok, k=torch.randn(2, 8, 2, 160), q=torch.randn(2, 8, 2, 160), backend="triton"), "K=160"),
        (dict(ok, q=q.double(), k=k.double(), v=v.double(), backend="triton"), "backend='triton' needs q/k/v in"),
        (dict(ok, v=v.half(), backend="triton"), "q, k, v of one dtype"),
    ]


@pytest.mark.parametrize("kwargs,message", _bad_input_cases())
def test_bad_input_raises_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        gated_delta_rule(**kwargs)
