"""`linear_attention`: chunked PyTorch and Triton (interpreter) against the float64 token-by-token reference."""
from __future__ import annotations

import pytest
import torch

from lctrain.kernels.linear_attention import linear_attention


def _make_inputs(batch, length, heads, key_dim, value_dim, decay, with_initial, num_seqs, dtype):
    """Random leaf tensors in `dtype`; decay is None, "head" (`[H]`) or "token" (`[B, T, H]`).

    Values are drawn in float32 first, so a float64 reference and a float32 run see identical inputs.
    """
    def draw(*shape):
        return torch.randn(*shape, dtype=torch.float32).to(dtype)

    q = draw(batch, length, heads, key_dim)
    k = draw(batch, length, heads, key_dim) / key_dim ** 0.5
    v = draw(batch, length, heads, value_dim)
    log_decay = None
    if decay == "head":
        log_decay = -torch.rand(heads, dtype=torch.float32).to(dtype) * 0.5
    elif decay == "token":
        log_decay = torch.nn.functional.logsigmoid(draw(batch, length, heads) + 2)
    initial = draw(num_seqs, heads, key_dim, value_dim) if with_initial else None
    for t in (q, k, v, log_decay, initial):
        if t is not None:
            t.requires_grad_()
    return q, k, v, log_decay, initial


def _run(backend, q, k, v, log_decay, initial, cu_seqlens, dtype=None):
    """Output, final state and the gradients of a loss touching both, as float64 tensors (None kept)."""
    leaves = [t if t is None or dtype is None else t.detach().to(dtype).requires_grad_()
              for t in (q, k, v, log_decay, initial)]
    o, final = linear_attention(*leaves[:4], initial_state=leaves[4], output_final_state=True,
                                cu_seqlens=cu_seqlens, backend=backend)
    gen = torch.Generator().manual_seed(1)
    o_weight = torch.randn(o.shape, generator=gen, dtype=torch.float64)
    s_weight = torch.randn(final.shape, generator=gen, dtype=torch.float64)
    loss = (o.double() * o_weight).sum() + (final.double() * s_weight).sum()
    wanted = [t for t in leaves if t is not None]
    grads = iter(torch.autograd.grad(loss, wanted))
    results = {"o": o, "final_state": final}
    for name, t in zip(("dq", "dk", "dv", "dlog_decay", "dinitial_state"), leaves):
        results[name] = None if t is None else next(grads)
    return {name: None if t is None else t.double() for name, t in results.items()}


# (B, T, H, K, V, decay, initial state, packed document lengths or None)
CASES = [
    (2, 37, 3, 16, 32, "token", True, None),
    (1, 130, 1, 64, 16, "head", False, None),
    (2, 1, 3, 32, 32, None, True, None),
    (1, 180, 3, 32, 64, "token", True, [1, 15, 64, 100]),
    (1, 100, 1, 16, 16, "head", True, [37, 0, 63]),
]


def _case_inputs(case, dtype):
    batch, length, heads, key_dim, value_dim, decay, with_initial, docs = case
    cu_seqlens = None
    num_seqs = batch
    if docs is not None:
        cu_seqlens = torch.tensor([0] + torch.tensor(docs).cumsum(0).tolist(), dtype=torch.int32)
        num_seqs = len(docs)
    inputs = _make_inputs(batch, length, heads, key_dim, value_dim, decay, with_initial, num_seqs, dtype)
    return inputs, cu_seqlens


def _case_id(case):
    batch, length, heads, key_dim, value_dim, decay, with_initial, docs = case
    return f"B{batch}T{length}H{heads}K{key_dim}V{value_dim}-{decay}-h0{int(with_initial)}-docs{docs}"


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_chunk_matches_naive_in_float64(case):
    inputs, cu_seqlens = _case_inputs(case, torch.float64)
    expected = _run("naive", *inputs, cu_seqlens)
    actual = _run("torch", *inputs, cu_seqlens)
    for name, ref in expected.items():
        if ref is None:
            assert actual[name] is None, name
            continue
        assert actual[name].shape == ref.shape, name
        torch.testing.assert_close(actual[name], ref, rtol=1e-10, atol=1e-10, msg=name)


def _relative_error(actual, expected):
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-12)).item()


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_triton_matches_naive_in_float32(case):
    inputs, cu_seqlens = _case_inputs(case, torch.float64)
    expected = _run("naive", *inputs, cu_seqlens)
    actual = _run("triton", *inputs, cu_seqlens, dtype=torch.float32)
    for name, ref in expected.items():
        if ref is None:
            assert actual[name] is None, name
            continue
        assert actual[name].shape == ref.shape, name
        # The kernels fill NaN-poisoned buffers: an element a kernel forgot to write shows up here.
        assert torch.isfinite(actual[name]).all(), name
        # A per-head decay gradient sums the per-token ones over T, and those come from q.dq - k.dk, which
        # cancels: fp32 rounding grows with T there, so that one sum gets a looser bound.
        tolerance = 1e-3 if name == "dlog_decay" and ref.dim() == 1 else 1e-4
        assert _relative_error(actual[name], ref) < tolerance, name


def test_final_state_is_none_unless_requested_and_dtypes_follow_q():
    q, k, v, log_decay, _ = _make_inputs(1, 20, 2, 16, 16, "token", False, 1, torch.float32)
    for backend in ("naive", "torch", "triton"):
        o, final = linear_attention(q, k, v, log_decay, backend=backend)
        assert final is None
        assert o.dtype == torch.float32 and o.shape == (1, 20, 2, 16)
    _, final = linear_attention(q, k, v, log_decay, output_final_state=True, backend="triton")
    assert final.dtype == torch.float32 and final.shape == (1, 2, 16, 16)


def test_default_backend_on_cpu_is_chunked_torch_and_scale_defaults_to_inverse_sqrt_k():
    q, k, v, log_decay, _ = _make_inputs(1, 70, 2, 16, 32, "token", False, 1, torch.float64)
    auto, _ = linear_attention(q, k, v, log_decay)
    explicit, _ = linear_attention(q, k, v, log_decay, scale=16 ** -0.5, backend="naive")
    torch.testing.assert_close(auto, explicit, rtol=1e-10, atol=1e-10)
    doubled, _ = linear_attention(q, k, v, log_decay, scale=2 * 16 ** -0.5, backend="torch")
    torch.testing.assert_close(doubled, 2 * auto, rtol=1e-10, atol=1e-10)


def test_packed_documents_equal_separate_sequences():
    lengths = [5, 40, 19]
    q, k, v, log_decay, initial = _make_inputs(1, sum(lengths), 2, 16, 16, "token", True, 3, torch.float64)
    cu_seqlens = torch.tensor([0, 5, 45, 64], dtype=torch.int32)
    packed_o, packed_state = linear_attention(q, k, v, log_decay, initial_state=initial, output_final_state=True,
                                              cu_seqlens=cu_seqlens, backend="torch")
    for n, (start, end) in enumerate(zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist())):
        o, state = linear_attention(q[:, start:end], k[:, start:end], v[:, start:end], log_decay[:, start:end],
                                    initial_state=initial[n:n + 1], output_final_state=True, backend="naive")
        torch.testing.assert_close(packed_o[:, start:end], o, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(packed_state[n:n + 1], state, rtol=1e-10, atol=1e-10)


def _good(**overrides):
    args = dict(q=torch.randn(1, 8, 2, 16), k=torch.randn(1, 8, 2, 16), v=torch.randn(1, 8, 2, 32))
    args.update(overrides)
    return args


@pytest.mark.parametrize("overrides, message", [
    (dict(q=torch.randn(8, 2, 16)), "q must be a 4-D tensor"),
    (dict(k=torch.randn(1, 8, 2, 8)), "k shape"),
    (dict(v=torch.randn(1, 7, 2, 32)), "v shape"),
    (dict(v=torch.randn(1, 8, 2, 32, dtype=torch.float64)), "share one dtype"),
    (dict(q=torch.ones(1, 8, 2, 16, dtype=torch.int64)), "q dtype"),
    (dict(log_decay=-torch.rand(3)), "log_decay must be None"),
    (dict(log_decay=-torch.rand(1, 8, 3)), "log_decay must be None"),
    (dict(log_decay=torch.rand(2) + 0.1), "log_decay values must be <= 0"),
    (dict(initial_state=torch.zeros(1, 2, 16, 16)), "initial_state must be"),
    (dict(cu_seqlens=torch.tensor([0, 8], dtype=torch.float32)), "cu_seqlens must be an int32 or int64"),
    (dict(cu_seqlens=torch.tensor([0, 3, 7], dtype=torch.int32)), "end at T=8"),
    (dict(cu_seqlens=torch.tensor([0, 6, 2, 8], dtype=torch.int32)), "non-decreasing"),
    (dict(backend="cuda"), "backend='cuda'"),
    (dict(scale="big"), "scale must be"),
])
def test_bad_input_raises_a_clear_value_error(overrides, message):
    with pytest.raises(ValueError, match=message):
        linear_attention(**_good(**overrides))


def test_packed_layout_needs_batch_one():
    args = _good(q=torch.randn(2, 8, 2, 16), k=torch.randn(2, 8, 2, 16), v=torch.randn(2, 8, 2, 32))
    with pytest.raises(ValueError, match="batch size 1"):
        linear_attention(**args, cu_seqlens=torch.tensor([0, 8], dtype=torch.int32))


def test_triton_rejects_what_its_kernels_cannot_run():
    with pytest.raises(ValueError, match="K <= 128"):
        linear_attention(torch.randn(1, 4, 1, 160), torch.randn(1, 4, 1, 160), torch.randn(1, 4, 1, 16),
                         backend="triton")
    with pytest.raises(ValueError, match="float64"):
        linear_attention(**_good(**{n: t.double() for n, t in _good().items()}), backend="triton")


def test_launch_config_rejects_unsupported_dims_and_names():
    from lctrain.kernels.linear_attention.triton_config import launch_config

    assert launch_config(128, 256, "bf16", "fwd").block_k == 64  # wide heads split over key blocks
    with pytest.raises(ValueError, match="K=129"):
        launch_config(129, 64, "bf16", "fwd")
    with pytest.raises(ValueError, match="dtype='fp64'"):
        launch_config(64, 64, "fp64", "fwd")
    with pytest.raises(ValueError, match="kernel='bwd'"):
        launch_config(64, 64, "bf16", "bwd")
