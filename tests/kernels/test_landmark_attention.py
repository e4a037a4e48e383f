"""`landmark_attention`: the float64 reference against the rule written per query, the blocked PyTorch path and
the Triton kernels (interpreter) against the reference."""
from __future__ import annotations

import math

import pytest
import torch

from lctrain.kernels.landmark_attention import landmark_attention


def _per_query_rule(q, k, v, block_size, scale):
    """The grouped softmax spelled out for one query at a time (one batch row, one head): q, k, v `[T, D]`."""
    length = q.shape[0]
    num_complete = length // block_size
    out = torch.zeros(length, v.shape[-1], dtype=torch.float64)
    for i in range(length):
        b = i // block_size
        own = [j for j in range(b * block_size, i + 1) if j % block_size != block_size - 1 or j // block_size >= num_complete]
        landmarks = [c * block_size + block_size - 1 for c in range(b)]
        logits = [scale * float(q[i] @ k[j]) for j in own + landmarks]
        top = max(logits)
        z = sum(math.exp(s - top) for s in logits)
        for j, s in zip(own, logits):
            out[i] += math.exp(s - top) / z * v[j]
        for c, s in zip(range(b), logits[len(own):]):
            gate = math.exp(s - top) / z
            members = range(c * block_size, c * block_size + block_size - 1)
            inner = torch.softmax(torch.stack([scale * (q[i] @ k[j]) for j in members]), dim=0)
            for weight, j in zip(inner, members):
                out[i] += gate * weight * v[j]
    return out


def test_reference_follows_the_grouped_softmax_rule():
    q, k, v = (torch.randn(1, 23, 2, 4, dtype=torch.float64) for _ in range(3))
    o = landmark_attention(q, k, v, block_size=5, backend="naive")
    for h in range(2):
        expected = _per_query_rule(q[0, :, h], k[0, :, h], v[0, :, h], 5, 0.5)
        torch.testing.assert_close(o[0, :, h], expected, rtol=1e-12, atol=1e-12)


def test_landmark_values_and_future_tokens_are_never_used():
    q, k, v = (torch.randn(1, 20, 1, 4, dtype=torch.float64) for _ in range(3))
    o = landmark_attention(q, k, v, 5, backend="torch")
    moved = v.clone()
    moved[:, 4::5] += 100.0  # landmark values
    torch.testing.assert_close(landmark_attention(q, k, moved, 5, backend="torch"), o, rtol=0, atol=1e-12)
    later = k.clone()
    later[:, 12:] += 3.0  # keys from token 12 on cannot change outputs before it
    changed = landmark_attention(q, later, v, 5, backend="torch")
    torch.testing.assert_close(changed[:, :12], o[:, :12], rtol=0, atol=1e-12)
    assert not torch.allclose(changed[:, 12:], o[:, 12:])


def _run(backend, q, k, v, block_size, cu_seqlens=None, dtype=None):
    leaves = [t.detach().to(dtype or t.dtype).requires_grad_() for t in (q, k, v)]
    o = landmark_attention(*leaves, block_size, backend=backend, cu_seqlens=cu_seqlens)
    weight = torch.randn(o.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grads = torch.autograd.grad((o.double() * weight).sum(), leaves)
    return {name: t.double() for name, t in zip(("o", "dq", "dk", "dv"), (o, *grads))}


# (B, T, H, D, V, block_size, packed document lengths or None)
CASES = [
    (2, 37, 2, 16, 16, 8, None),  # T not a multiple of the block
    (1, 50, 1, 32, 16, 16, [3, 30, 0, 17]),  # packed documents, one empty, one shorter than a block
    (1, 9, 3, 16, 32, 4, None),
    (1, 11, 1, 8, 8, 2, None),  # smallest block: one member and a landmark, five earlier blocks
    # 40-token blocks in 64-row key tiles, several query tiles per block (the last one partly past the block),
    # packed documents ending in partial blocks, D != V and both padded to a 128-wide head
    (1, 90, 1, 100, 48, 40, [83, 7]),
    (2, 70, 1, 64, 64, 33, None),  # 64-wide heads: 16-row query tiles in the backward pass
]


def _case_id(case):
    return "B{}T{}H{}D{}V{}-L{}-docs{}".format(*case)


def _case_inputs(case):
    batch, length, heads, dim, value_dim, block, docs = case
    cu_seqlens = None
    if docs is not None:
        cu_seqlens = torch.tensor([0] + torch.tensor(docs).cumsum(0).tolist(), dtype=torch.int32)
    q = torch.randn(batch, length, heads, dim).double()
    k = torch.randn(batch, length, heads, dim).double()
    v = torch.randn(batch, length, heads, value_dim).double()
    return (q, k, v), block, cu_seqlens


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_blocked_torch_matches_naive_in_float64(case):
    tensors, block, cu_seqlens = _case_inputs(case)
    expected = _run("naive", *tensors, block, cu_seqlens)
    actual = _run("torch", *tensors, block, cu_seqlens)
    for name, ref in expected.items():
        assert actual[name].shape == ref.shape, name
        torch.testing.assert_close(actual[name], ref, rtol=1e-10, atol=1e-10, msg=name)


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_triton_matches_naive_in_float32(case):
    pytest.importorskip("lctrain.kernels.landmark_attention.triton_blocks")
    tensors, block, cu_seqlens = _case_inputs(case)
    expected = _run("naive", *tensors, block, cu_seqlens)
    actual = _run("triton", *tensors, block, cu_seqlens, dtype=torch.float32)
    for name, ref in expected.items():
        assert torch.isfinite(actual[name]).all(), name  # NaN-poisoned outputs: every element was written
        error = ((actual[name] - ref).abs().max() / ref.abs().max()).item()
        assert error < 1e-4, (name, error)


@pytest.mark.parametrize("overrides, message", [
    (dict(q=torch.randn(1, 8, 2, 129), k=torch.randn(1, 8, 2, 129)), "head dims <= 128"),
    (dict(v=torch.randn(1, 8, 2, 200)), "head dims <= 128"),
    (dict(block_size=65), "block_size <= 64"),
    (dict(q=torch.randn(1, 8, 2, 4).double(), k=torch.randn(1, 8, 2, 4).double(),
          v=torch.randn(1, 8, 2, 3).double()), "float64"),
])
def test_triton_refuses_what_its_kernels_do_not_cover(overrides, message):
    pytest.importorskip("lctrain.kernels.landmark_attention.triton_blocks")
    from lctrain.kernels.landmark_attention.triton_config import MAX_BLOCK_SIZE, MAX_HEAD_DIM

    assert (MAX_HEAD_DIM, MAX_BLOCK_SIZE) == (128, 64)
    with pytest.raises(ValueError, match=message):
        landmark_attention(**_good(**overrides), backend="triton")


def test_packed_documents_equal_separate_sequences():
    q, k, v = (torch.randn(1, 30, 2, 8, dtype=torch.float64) for _ in range(3))
    cu_seqlens = torch.tensor([0, 11, 30], dtype=torch.int32)
    packed = landmark_attention(q, k, v, 4, cu_seqlens=cu_seqlens)
    for start, end in ((0, 11), (11, 30)):
        alone = landmark_attention(q[:, start:end], k[:, start:end], v[:, start:end], 4, backend="naive")
        torch.testing.assert_close(packed[:, start:end], alone, rtol=1e-12, atol=1e-12)


def _good(**overrides):
    args = dict(q=torch.randn(1, 8, 2, 4), k=torch.randn(1, 8, 2, 4), v=torch.randn(1, 8, 2, 3), block_size=4)
    args.update(overrides)
    return args


@pytest.mark.parametrize("overrides, message", [
    (dict(q=torch.randn(8, 2, 4)), "q must be a 4-D tensor"),
    (dict(k=torch.randn(1, 8, 2, 5)), "k shape"),
    (dict(v=torch.randn(1, 7, 2, 3)), "v shape"),
    (dict(block_size=1), "block_size must be an int >= 2"),
    (dict(block_size=4.0), "block_size must be an int >= 2"),
    (dict(scale="x"), "scale must be"),
    (dict(backend="flash"), "backend='flash'"),
    (dict(cu_seqlens=torch.tensor([0, 8.0])), "cu_seqlens must be an int32"),
])
def test_bad_input_raises_a_clear_value_error(overrides, message):
    with pytest.raises(ValueError, match=message):
        landmark_attention(**_good(**overrides))
