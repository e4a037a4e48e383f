"""The `attention` Triton kernels in the interpreter (fp32) against the float64 reference: outputs, log-sum-exp and
every gradient, plain and block form."""
from __future__ import annotations

import pytest
import torch

from lctrain.kernels.attention import attention, attention_backward, attention_forward, merge_partials
from tests.kernels.attention_cases import CASES, close, grads, make_inputs, offsets, reference


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_triton_matches_reference_outputs_lse_and_every_gradient(case):
    _, b, t, h, hkv, d, dv, lengths, window, sink = case
    q, k, v = make_inputs(b, t, h, hkv, d, dv, dtype=torch.float32)
    cu = offsets(lengths)
    o, lse = attention(q, k, v, cu_seqlens=cu, window=window, sink=sink, return_lse=True, backend="triton")
    o_ref, lse_ref = reference(q, k, v, cu, window, sink)
    close(o, o_ref, 2e-5)
    close(lse, lse_ref, 2e-5)
    w_o, w_lse = torch.randn(o.shape, dtype=torch.float64), torch.randn(lse.shape, dtype=torch.float64)
    for got, want in zip(grads((o, lse), (w_o, w_lse), (q, k, v)),
                         grads((o_ref, lse_ref), (w_o, w_lse), (q, k, v))):
        close(got, want, 1e-4)


def test_triton_unequal_head_dims_and_long_rows():
    """Dv != D, several query and key blocks of every kernel, documents crossing block edges."""
    q, k, v = make_inputs(1, 150, 2, 1, 8, 16, dtype=torch.float32)
    cu = offsets([70, 3, 77])
    o = attention(q, k, v, cu_seqlens=cu, window=40, sink=3, backend="triton")
    o_ref, _ = reference(q, k, v, cu, 40, 3)
    close(o, o_ref, 2e-5)
    w = torch.randn(o.shape, dtype=torch.float64)
    for got, want in zip(grads((o,), (w,), (q, k, v)), grads((o_ref,), (w,), (q, k, v))):
        close(got, want, 1e-4)


def test_triton_block_form_merges_to_the_full_result():
    lengths, t, c = [40, 1, 45, 10], 96, 32
    q, k, v = make_inputs(1, t, 2, 1, 16, 16, dtype=torch.float32)
    cu = offsets(lengths)
    o_ref, lse_ref = reference(q, k, v, cu, None, 0)
    w = torch.randn(o_ref.shape, dtype=torch.float64)
    want = grads((o_ref,), (w,), (q, k, v))
    dq, dk, dv = (torch.zeros(x.shape, dtype=torch.float64) for x in (q, k, v))
    for i in range(t // c):
        qs = slice(i * c, (i + 1) * c)
        kw = dict(cu_seqlens=cu, cu_seqlens_cpu=cu, q_offset=i * c, backend="triton")
        o = lse = None
        for j in range(t // c):
            ks = slice(j * c, (j + 1) * c)
            o, lse = merge_partials(o, lse, *attention_forward(q[:, qs], k[:, ks], v[:, ks], k_offset=j * c, **kw))
        close(o, o_ref[:, qs], 2e-5)
        close(lse, lse_ref[:, :, qs], 2e-5)
        for j in range(t // c):
            ks = slice(j * c, (j + 1) * c)
            g = attention_backward(q[:, qs], k[:, ks], v[:, ks], o, lse, w[:, qs].float(), k_offset=j * c, **kw)
            dq[:, qs] += g[0].double()
            dk[:, ks] += g[1].double()
            dv[:, ks] += g[2].double()
    for got, ref in zip((dq, dk, dv), want):
        close(got, ref, 1e-4)


def test_triton_rejects_float64_and_wide_heads():
    q, k, v = make_inputs(1, 8, 2, 1, 4, 4)
    with pytest.raises(ValueError, match="does not support float64"):
        attention(q, k, v, backend="triton")
    q, k, v = make_inputs(1, 8, 1, 1, 160, 160, dtype=torch.float32)
    with pytest.raises(ValueError, match="head dims D, Dv <= 128"):
        attention(q, k, v, backend="triton")
