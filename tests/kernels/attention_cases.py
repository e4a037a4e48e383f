"""Shared cases of the `attention` tests: awkward shapes, their float64 reference, and a gradient check."""
from __future__ import annotations

import torch

from lctrain.kernels.attention import naive_attention
from lctrain.kernels.attention.pattern import Pattern

# (name, B, T, H, Hkv, D, Dv, document lengths or None, window, sink)
CASES = [
    ("one_doc_gqa", 2, 37, 4, 2, 8, 8, None, None, 0),
    ("packed_one_token_docs", 1, 45, 4, 1, 16, 8, [1, 9, 1, 1, 20, 13], None, 0),
    ("window_sink", 1, 53, 2, 2, 8, 8, [30, 1, 22], 5, 2),
    ("per_head_spans", 1, 41, 4, 2, 8, 16, [17, 24], [3, 9, 41, 1], [0, 2, 1, 4]),
    ("window_no_sink_rows", 3, 29, 2, 1, 4, 4, None, 7, 0),
]


def make_inputs(b, t, h, hkv, d, dv, dtype=torch.float64, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, t, h, d, generator=g, dtype=torch.float64)
    k = torch.randn(b, t, hkv, d, generator=g, dtype=torch.float64)
    v = torch.randn(b, t, hkv, dv, generator=g, dtype=torch.float64)
    return [x.to(device=device, dtype=dtype).requires_grad_() for x in (q, k, v)]


def offsets(lengths):
    if lengths is None:
        return None
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)


def reference(q, k, v, cu, window, sink, scale=None, q_offset=0, k_offset=0):
    heads = q.shape[2]
    spans = (lambda s: () if s is None else tuple([s] * heads if isinstance(s, int) else s))
    windows = spans(window)
    pattern = Pattern(True, windows, spans(sink) if windows else (), scale or q.shape[-1] ** -0.5, q_offset,
                      k_offset, None if cu is None else tuple(cu.tolist()))
    return naive_attention(q, k, v, pattern, cu)


def grads(outputs, weights, inputs):
    loss = sum((o.double() * w).sum() for o, w in zip(outputs, weights))
    return torch.autograd.grad(loss, inputs)


def close(actual, expected, tol):
    actual, expected = actual.double(), expected.double()
    finite = torch.isfinite(expected)
    assert torch.equal(finite, torch.isfinite(actual)), "infinite entries differ"
    err = (actual[finite] - expected[finite]).abs().max().item() if finite.any() else 0.0
    scale = expected[finite].abs().max().item() if finite.any() else 1.0
    assert err <= tol * max(scale, 1.0), f"max abs error {err:.3e} > {tol} * {max(scale, 1.0):.3e}"
