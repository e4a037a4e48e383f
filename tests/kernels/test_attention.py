"""`lctrain.kernels.attention` (torch path, custom op, block form) against its float64 dense reference."""
from __future__ import annotations

import pytest
import torch

from lctrain.kernels.attention import attention, attention_backward, attention_forward, blockwise, merge_partials
from tests.kernels.attention_cases import CASES, close, grads, make_inputs, offsets, reference


@pytest.fixture
def small_blocks(monkeypatch):
    # several query blocks and key pieces even at these lengths, none aligned with a document
    monkeypatch.setattr(blockwise, "Q_BLOCK", 8)
    monkeypatch.setattr(blockwise, "K_BLOCK", 5)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_torch_path_matches_reference_outputs_lse_and_every_gradient(case, small_blocks):
    _, b, t, h, hkv, d, dv, lengths, window, sink = case
    q, k, v = make_inputs(b, t, h, hkv, d, dv)
    cu = offsets(lengths)
    o, lse = attention(q, k, v, cu_seqlens=cu, window=window, sink=sink, return_lse=True, backend="torch")
    o_ref, lse_ref = reference(q, k, v, cu, window, sink)
    close(o, o_ref, 1e-12)
    close(lse, lse_ref, 1e-12)
    g = torch.Generator().manual_seed(1)
    w_o, w_lse = torch.randn(o.shape, generator=g, dtype=torch.float64), torch.randn(lse.shape, generator=g,
                                                                                      dtype=torch.float64)
    for got, want in zip(grads((o, lse), (w_o, w_lse), (q, k, v)),
                         grads((o_ref, lse_ref), (w_o, w_lse), (q, k, v))):
        close(got, want, 1e-11)


def test_float32_and_bfloat16_inputs_accumulate_in_float32(small_blocks):
    _, b, t, h, hkv, d, dv, lengths, window, sink = CASES[2]
    for dtype, tol in ((torch.float32, 2e-5), (torch.bfloat16, 3e-2)):
        q, k, v = make_inputs(b, t, h, hkv, d, dv, dtype=dtype)
        o, lse = attention(q, k, v, cu_seqlens=offsets(lengths), window=window, sink=sink, return_lse=True)
        assert o.dtype == dtype and lse.dtype == torch.float32
        o_ref, lse_ref = reference(q, k, v, offsets(lengths), window, sink)
        close(o, o_ref, tol)
        close(lse, lse_ref, tol)
        dq, dk, dv_ = torch.autograd.grad(o.float().sum(), (q, k, v))
        rq, rk, rv = torch.autograd.grad(o_ref.sum(), (q, k, v))
        assert dq.dtype == dtype
        for got, want in ((dq, rq), (dk, rk), (dv_, rv)):
            close(got, want, tol * 4)


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_block_form_merges_to_the_full_result_and_splits_its_gradient(layout, small_blocks):
    """Chunks of a row as SP ranks hold them: every (query chunk, key chunk) block through the op's block form,
    merged by log-sum-exp, equals the full op; each block's backward share sums to the full gradient."""
    lengths, window, sink = [11, 1, 30, 6], 9, 2
    t, chunks = 48, 6
    q, k, v = make_inputs(1, t, 4, 2, 8, 8)
    cu = offsets(lengths)
    c = t // chunks
    order = list(range(chunks)) if layout == "contiguous" else [0, 5, 1, 4, 2, 3]
    for spans in ((None, 0), (window, sink)):
        o_ref, lse_ref = reference(q, k, v, cu, *spans)
        w = torch.randn(o_ref.shape, dtype=torch.float64)
        ref_grads = grads((o_ref,), (w,), (q, k, v))
        dq, dk, dv = (torch.zeros_like(x) for x in (q, k, v))
        for i in order:
            qs = slice(i * c, (i + 1) * c)
            o = lse = None
            kw = dict(cu_seqlens=cu, cu_seqlens_cpu=cu, window=spans[0], sink=spans[1], q_offset=i * c)
            for j in order:
                ks = slice(j * c, (j + 1) * c)
                o_b, lse_b = attention_forward(q[:, qs], k[:, ks], v[:, ks], k_offset=j * c, **kw)
                o, lse = merge_partials(o, lse, o_b, lse_b)
            close(o, o_ref[:, qs], 1e-12)
            close(lse, lse_ref[:, :, qs], 1e-12)
            for j in order:
                ks = slice(j * c, (j + 1) * c)
                g = attention_backward(q[:, qs], k[:, ks], v[:, ks], o, lse, w[:, qs], k_offset=j * c, **kw)
                dq[:, qs] += g[0]
                dk[:, ks] += g[1]
                dv[:, ks] += g[2]
        for got, want in zip((dq, dk, dv), ref_grads):
            close(got, want, 1e-11)


def test_block_that_sees_nothing_gives_zero_output_and_minus_inf_lse():
    q, k, v = make_inputs(1, 8, 2, 2, 4, 4)
    o, lse = attention_forward(q, k, v, q_offset=0, k_offset=8)          # keys after every query
    assert torch.equal(o, torch.zeros_like(o)) and bool(torch.isneginf(lse).all())


def test_decoding_queries_against_a_longer_cache():
    """Tq < Tk with q_offset: new tokens at the end of a row attend the whole prefix (the decoding case)."""
    q, k, v = make_inputs(2, 20, 4, 2, 8, 8)
    full = attention(q, k, v, backend="naive")
    tail = attention(q[:, 15:], k, v, q_offset=15, window=None)
    close(tail, full[:, 15:], 1e-12)


def test_custom_op_is_one_opaque_node_under_compile():
    q, k, v = make_inputs(1, 16, 2, 1, 8, 8, dtype=torch.float32)
    cu = torch.tensor([0, 5, 16], dtype=torch.int32)
    fn = torch.compile(lambda a, b, c: attention(a, b, c, cu_seqlens=cu, cu_seqlens_cpu=cu, backend="torch"),
                       fullgraph=True, backend="eager")
    out = fn(q, k, v)
    close(out, reference(q, k, v, cu, None, 0)[0], 1e-5)
    torch.library.opcheck(torch.ops.lctrain.attention_fwd.default,
                          (q.detach(), k.detach(), v.detach(), cu, cu, True, [], [], 0.3, 0, 0, "torch"))


@pytest.mark.parametrize("kwargs, message", [
    (dict(window=0), "window must be an int >= 1"),
    (dict(sink=2), "needs a window"),
    (dict(cu_seqlens=torch.tensor([0, 5, 9], dtype=torch.int32)), "must start at 0, be non-decreasing"),
    (dict(backend="bogus"), "backend='bogus'"),
    (dict(window=[2, 3, 4]), "per-head ints"),
    (dict(q_offset=-1), "q_offset must be an int >= 0"),
])
def test_bad_arguments_raise_one_line_errors(kwargs, message):
    q, k, v = make_inputs(1, 10, 2, 1, 4, 4)
    with pytest.raises(ValueError, match=message) as err:
        attention(q, k, v, **kwargs)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("lengths", [None, [7, 1, 20, 9]])
def test_torch_backend_sdpa_fast_path_matches_reference(lengths):
    """Without log-sum-exp, window or block form, "torch" runs SDPA per document: same values and gradients."""
    b = 2 if lengths is None else 1
    q, k, v = make_inputs(b, 37, 4, 2, 8, 8)
    cu = offsets(lengths)
    o = attention(q, k, v, cu_seqlens=cu, backend="torch")
    o_ref, _ = reference(q, k, v, cu, None, 0)
    close(o, o_ref, 1e-12)
    w = torch.randn(o.shape, dtype=torch.float64)
    for got, want in zip(grads((o,), (w,), (q, k, v)), grads((o_ref,), (w,), (q, k, v))):
        close(got, want, 1e-11)
