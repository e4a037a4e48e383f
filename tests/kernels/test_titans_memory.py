"""`titans_linear_memory`: chunked PyTorch and Triton (interpreter) against the float64 token-by-token reference."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lctrain.kernels.titans_memory import titans_linear_memory

GATES = ("alpha", "eta", "theta")


def _make_inputs(batch, length, heads, key_dim, value_dim, with_initial, num_seqs, dtype):
    """Random leaf tensors (drawn in float32 first, so float64 and float32 runs see identical values)."""
    def draw(*shape):
        return torch.randn(*shape, dtype=torch.float32)

    q = draw(batch, length, heads, key_dim)
    k = F.normalize(draw(batch, length, heads, key_dim), dim=-1)
    v = draw(batch, length, heads, value_dim)
    alpha = torch.rand(batch, length, heads) * 0.2
    eta = 0.5 + 0.5 * torch.rand(batch, length, heads)
    theta = torch.rand(batch, length, heads) * 0.5
    initial = None
    if with_initial:
        initial = (draw(num_seqs, heads, key_dim, value_dim) * 0.3, draw(num_seqs, heads, key_dim, value_dim) * 0.1)
    tensors = [t.to(dtype).requires_grad_() for t in (q, k, v, alpha, eta, theta)]
    if initial is not None:
        initial = tuple(t.to(dtype).requires_grad_() for t in initial)
    return tensors, initial


def _run(backend, tensors, initial, chunk_size, cu_seqlens=None, dtype=None):
    """Output, final (M, S) and the gradients of a loss touching all three, as float64 tensors."""
    if dtype is not None:
        tensors = [t.detach().to(dtype).requires_grad_() for t in tensors]
        initial = None if initial is None else tuple(t.detach().to(dtype).requires_grad_() for t in initial)
    o, (memory, momentum) = titans_linear_memory(*tensors, chunk_size=chunk_size, initial_state=initial,
                                                 output_final_state=True, backend=backend, cu_seqlens=cu_seqlens)
    gen = torch.Generator().manual_seed(1)
    loss = sum((x.double() * torch.randn(x.shape, generator=gen, dtype=torch.float64)).sum()
               for x in (o, memory, momentum))
    leaves = list(tensors) + ([] if initial is None else list(initial))
    grads = torch.autograd.grad(loss, leaves)
    names = ["dq", "dk", "dv", "dalpha", "deta", "dtheta", "dM0", "dS0"][:len(leaves)]
    results = {"o": o, "M": memory, "S": momentum, **dict(zip(names, grads))}
    return {name: t.double() for name, t in results.items()}


# (B, T, H, K, V, chunk_size, initial state, packed document lengths or None)
CASES = [
    (2, 37, 2, 8, 16, 16, True, None),  # T not a multiple of the chunk
    (1, 21, 1, 16, 8, 1, False, None),  # fully sequential
    (1, 45, 2, 8, 8, 8, True, [13, 0, 32]),  # packed documents, one empty
]
# Triton-only: several V blocks with a ragged last one, two K blocks in the per-chunk kernels, a chunk that is
# not a power of two, documents shorter than a chunk.
TRITON_CASES = CASES + [
    (1, 50, 1, 64, 40, 5, True, [1, 31, 18]),
]


def _case_id(case):
    return "B{}T{}H{}K{}V{}-C{}-h0{}-docs{}".format(*case[:6], int(case[6]), case[7])


def _case_inputs(case, dtype):
    batch, length, heads, key_dim, value_dim, chunk, with_initial, docs = case
    cu_seqlens = None
    if docs is not None:
        cu_seqlens = torch.tensor([0] + torch.tensor(docs).cumsum(0).tolist(), dtype=torch.int32)
    num_seqs = batch if docs is None else len(docs)
    tensors, initial = _make_inputs(batch, length, heads, key_dim, value_dim, with_initial, num_seqs, dtype)
    return tensors, initial, chunk, cu_seqlens


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_chunk_matches_naive_in_float64(case):
    tensors, initial, chunk, cu_seqlens = _case_inputs(case, torch.float64)
    expected = _run("naive", tensors, initial, chunk, cu_seqlens)
    actual = _run("torch", tensors, initial, chunk, cu_seqlens)
    assert expected.keys() == actual.keys()
    for name, ref in expected.items():
        assert actual[name].shape == ref.shape, name
        torch.testing.assert_close(actual[name], ref, rtol=1e-10, atol=1e-10, msg=name)


def _relative_error(actual, expected):
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-12)).item()


@pytest.mark.parametrize("case", TRITON_CASES, ids=_case_id)
def test_triton_matches_naive_in_float32(case):
    pytest.importorskip("lctrain.kernels.titans_memory.triton_chunk")
    tensors, initial, chunk, cu_seqlens = _case_inputs(case, torch.float64)
    expected = _run("naive", tensors, initial, chunk, cu_seqlens)
    actual = _run("triton", tensors, initial, chunk, cu_seqlens, dtype=torch.float32)
    for name, ref in expected.items():
        # Output buffers start as NaN: an element a kernel forgot to write shows up here.
        assert torch.isfinite(actual[name]).all(), name
        assert _relative_error(actual[name], ref) < 1e-4, name


def test_triton_chunk_limits_and_optional_outputs():
    pytest.importorskip("lctrain.kernels.titans_memory.triton_chunk")
    from lctrain.kernels.titans_memory.triton_config import MAX_CHUNK

    tensors, initial = _make_inputs(1, 12, 1, 4, 4, True, 1, torch.float32)
    tensors = [t.detach() for t in tensors]
    with pytest.raises(ValueError, match="chunk_size <="):
        titans_linear_memory(*tensors, chunk_size=MAX_CHUNK + 1, backend="triton")
    with pytest.raises(ValueError, match="float64"):
        titans_linear_memory(*[t.double() for t in tensors], backend="triton")
    o, state = titans_linear_memory(*tensors, chunk_size=MAX_CHUNK, backend="triton")
    assert state is None and o.dtype == torch.float32
    reference, _ = titans_linear_memory(*tensors, chunk_size=MAX_CHUNK, backend="naive")
    torch.testing.assert_close(o, reference, rtol=1e-4, atol=1e-5)
    # Saturated gates (full forgetting, momentum reset) stay finite and exact in the kernels too.
    q, k, v, alpha, eta, theta = tensors
    alpha, eta = alpha.clone(), eta.clone()
    alpha[:, 3], eta[:, 7] = 1.0, 0.0
    saturated = (q, k, v, alpha, eta, theta)
    o, (memory, _) = titans_linear_memory(*saturated, chunk_size=5, initial_state=initial, output_final_state=True,
                                          backend="triton")
    ref_o, (ref_memory, _) = titans_linear_memory(*saturated, chunk_size=5, initial_state=initial,
                                                  output_final_state=True, backend="naive")
    torch.testing.assert_close(o, ref_o, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(memory, ref_memory, rtol=1e-4, atol=1e-5)


def _sequential_loop(q, k, v, alpha, eta, theta):
    """The online update written directly from its definition, token after token, one head at a time."""
    batch, length, heads, key_dim = q.shape
    out = torch.zeros(batch, length, heads, v.shape[-1], dtype=torch.float64)
    for b in range(batch):
        for h in range(heads):
            memory = torch.zeros(key_dim, v.shape[-1], dtype=torch.float64)
            momentum = torch.zeros_like(memory)
            for t in range(length):
                key = k[b, t, h]
                surprise = torch.outer(key, key @ memory - v[b, t, h])
                momentum = eta[b, t, h] * momentum - theta[b, t, h] * surprise
                memory = (1 - alpha[b, t, h]) * memory + momentum
                out[b, t, h] = q[b, t, h] @ memory
    return out


@pytest.mark.parametrize("backend", ["naive", "torch"])
def test_chunk_size_one_is_the_per_token_update(backend):
    tensors, _ = _make_inputs(2, 11, 2, 4, 3, False, 2, torch.float64)
    tensors = [t.detach() for t in tensors]
    o, _ = titans_linear_memory(*tensors, chunk_size=1, backend=backend)
    torch.testing.assert_close(o, _sequential_loop(*tensors), rtol=1e-12, atol=1e-12)
    # A larger chunk measures surprise against a stale memory: a different (and still well-defined) result.
    o_chunked, _ = titans_linear_memory(*tensors, chunk_size=4, backend=backend)
    assert not torch.allclose(o_chunked, o)


def test_state_hand_off_equals_one_call():
    """Two calls split at a chunk boundary, passing (M, S), equal one call: the decoding/SP contract."""
    tensors, initial = _make_inputs(1, 24, 2, 8, 8, True, 1, torch.float64)
    whole, whole_state = titans_linear_memory(*tensors, chunk_size=8, initial_state=initial,
                                              output_final_state=True)
    first, state = titans_linear_memory(*[t[:, :16] for t in tensors], chunk_size=8, initial_state=initial,
                                        output_final_state=True)
    second, last_state = titans_linear_memory(*[t[:, 16:] for t in tensors], chunk_size=8, initial_state=state,
                                              output_final_state=True)
    torch.testing.assert_close(torch.cat([first, second], dim=1), whole, rtol=1e-12, atol=1e-12)
    for a, b in zip(last_state, whole_state):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_saturated_gates_stay_finite():
    tensors, _ = _make_inputs(1, 20, 1, 4, 4, False, 1, torch.float64)
    q, k, v, alpha, eta, theta = [t.detach() for t in tensors]
    alpha, eta = alpha.clone(), eta.clone()
    alpha[:, 5], eta[:, 9] = 1.0, 0.0  # full forgetting, momentum reset
    ref, _ = titans_linear_memory(q, k, v, alpha, eta, theta, chunk_size=8, backend="naive")
    out, _ = titans_linear_memory(q, k, v, alpha, eta, theta, chunk_size=8, backend="torch")
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


def test_dtypes_and_default_backend():
    tensors, _ = _make_inputs(1, 10, 2, 8, 4, False, 1, torch.bfloat16)
    o, (memory, momentum) = titans_linear_memory(*tensors, output_final_state=True)
    assert o.dtype == torch.bfloat16 and o.shape == (1, 10, 2, 4)
    assert memory.dtype == momentum.dtype == torch.float32 and memory.shape == (1, 2, 8, 4)
    assert titans_linear_memory(*tensors)[1] is None


def _good(**overrides):
    args = dict(q=torch.randn(1, 8, 2, 4), k=torch.randn(1, 8, 2, 4), v=torch.randn(1, 8, 2, 3),
                alpha=torch.rand(1, 8, 2), eta=torch.rand(1, 8, 2), theta=torch.rand(1, 8, 2))
    args.update(overrides)
    return args


@pytest.mark.parametrize("overrides, message", [
    (dict(q=torch.randn(8, 2, 4)), "q must be a 4-D tensor"),
    (dict(k=torch.randn(1, 8, 2, 5)), "k shape"),
    (dict(v=torch.randn(1, 7, 2, 3)), "v shape"),
    (dict(alpha=torch.rand(1, 8)), "alpha must be"),
    (dict(eta=torch.rand(1, 8, 2) + 1.5), r"eta values must lie in \[0, 1\]"),
    (dict(theta=-torch.rand(1, 8, 2)), "theta values"),
    (dict(chunk_size=0), "chunk_size must be a positive int"),
    (dict(initial_state=torch.zeros(1, 2, 4, 3)), "pair"),
    (dict(initial_state=(torch.zeros(1, 2, 4, 3), torch.zeros(2, 2, 4, 3))), "initial_state S must be"),
    (dict(backend="cuda"), "backend='cuda'"),
    (dict(cu_seqlens=torch.tensor([0, 3, 7], dtype=torch.int32)), "end at T=8"),
])
def test_bad_input_raises_a_clear_value_error(overrides, message):
    with pytest.raises(ValueError, match=message):
        titans_linear_memory(**_good(**overrides))
