"""`sf_attention` (SinkLoRA SF-Attn / LongLoRA S²-Attn on the varlen `local_attention` kernel) against the dense
float64 reference, plus the segmentation plans it is built on."""
from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton (conftest sets it too)

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from lctrain.kernels.sf_attention import (  # noqa: E402
    naive_sf_attention, reassemble, segment, segment_plan, sf_attention)

# (B, T, H, Hkv, D, Dv, group_size, sink, document lengths over the flattened B*T tokens or None, variant)
CASES = [
    (2, 37, 4, 2, 8, 8, 8, 4, None, "sf"),  # T not a multiple of G, two rows, GQA
    (2, 37, 4, 2, 8, 8, 8, 0, None, "s2"),
    (1, 37, 2, 2, 8, 8, 8, 0, [10, 27], "sf"),  # no sink
    (1, 5, 2, 1, 8, 8, 16, 2, None, "sf"),  # G > T
    (1, 5, 2, 1, 8, 8, 16, 0, [2, 3], "s2"),  # G > T: a document in two rolled runs of one group
    (1, 40, 4, 1, 8, 12, 6, 4, [1, 2, 3, 13, 1, 20], "sf"),  # tiny documents, documents crossing groups, Dv != D
    (1, 40, 4, 1, 8, 12, 6, 0, [1, 2, 3, 13, 1, 20], "s2"),
    (1, 30, 2, 2, 8, 8, 4, 9, [3, 27], "sf"),  # sink longer than a document
    (2, 20, 4, 2, 8, 4, 4, 3, [7, 13, 2, 0, 18], "sf"),  # two rows packed over B*T, an empty document
    (2, 20, 4, 2, 8, 4, 4, 0, [7, 13, 2, 0, 18], "s2"),
    (1, 24, 6, 3, 8, 8, 8, 2, [11, 13], "sf"),  # odd GQA groups straddle the two head halves
]


def _case_id(case):
    batch, length, heads, kv_heads, dim, value_dim, group, sink, docs, variant = case
    return f"{variant}-B{batch}T{length}H{heads}kv{kv_heads}D{dim}Dv{value_dim}-G{group}-s{sink}-docs{docs}"


def _cu(docs):
    if docs is None:
        return None
    return torch.tensor([0] + torch.tensor(docs).cumsum(0).tolist(), dtype=torch.int32)


def _inputs(case):
    """Float64 leaves drawn in float32 (so a float32 run sees identical values) and cu_seqlens."""
    batch, length, heads, kv_heads, dim, value_dim, _, _, docs, _ = case
    q = torch.randn(batch, length, heads, dim).double().requires_grad_()
    k = torch.randn(batch, length, kv_heads, dim).double().requires_grad_()
    v = torch.randn(batch, length, kv_heads, value_dim).double().requires_grad_()
    return (q, k, v), _cu(docs)


def _run(fn, leaves, case, cu_seqlens, dtype=None, **kw):
    """Output and the gradients of a random projection of it, as float64."""
    group, sink, variant = case[6], case[7], case[9]
    if dtype is not None:
        leaves = [t.detach().to(dtype).requires_grad_() for t in leaves]
    o = fn(*leaves, group, sink, cu_seqlens=cu_seqlens, variant=variant, **kw)
    weight = torch.randn(o.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grads = torch.autograd.grad((o.double() * weight).sum(), leaves)
    return [t.double() for t in (o, *grads)]


# ----------------------------------------------------------------------------------------------- plans


@pytest.mark.parametrize("shifted, sink, wrap", [(False, 0, False), (False, 3, False), (True, 0, False),
                                                 (True, 3, False), (True, 0, True), (False, 0, True)])
@pytest.mark.parametrize("batch, length, docs", [(2, 23, None), (2, 23, [5, 1, 17, 2, 0, 21]), (1, 3, None)])
def test_reassemble_inverts_segment_exactly(shifted, sink, wrap, batch, length, docs):
    plan = segment_plan(batch, length, 6, _cu(docs), shifted=shifted, sink=sink, wrap=wrap)
    x = torch.randn(batch * length, 3, 5)
    packed = segment(x, plan)
    assert packed.shape[0] == int(plan.cu_seqlens[-1]) == plan.packed_length
    assert torch.equal(reassemble(packed, plan), x)
    assert torch.equal(plan.gather_index[plan.query_rows], torch.arange(batch * length))
    lengths = plan.cu_seqlens[1:] - plan.cu_seqlens[:-1]
    assert int(lengths.min()) >= 1 and int(lengths.max()) == plan.max_segment <= 6 + sink


def test_plans_on_a_small_row_spell_out_groups_prefixes_and_the_roll():
    def spelled(plan):
        cu = plan.cu_seqlens.tolist()
        return [plan.gather_index[a:b].tolist() for a, b in zip(cu, cu[1:])]

    assert spelled(segment_plan(1, 10, 4, sink=2)) == [[0, 1, 2, 3], [0, 1, 4, 5, 6, 7], [0, 1, 8, 9]]
    assert spelled(segment_plan(1, 10, 4, shifted=True, sink=2)) == [[0, 1], [0, 1, 2, 3, 4, 5],
                                                                     [0, 1, 6, 7, 8, 9]]
    assert spelled(segment_plan(1, 10, 4, shifted=True, wrap=True)) == [[2, 3, 4, 5], [6, 7, 8, 9], [0, 1]]
    # Documents [0, 3) and [3, 10): the sink restarts at 3 and a short document needs no prefix.
    cu = torch.tensor([0, 3, 10])
    assert spelled(segment_plan(1, 10, 4, cu, sink=2)) == [[0, 1, 2], [3], [3, 4, 5, 6, 7], [3, 4, 8, 9]]
    plan = segment_plan(1, 10, 4, cu, sink=2)
    assert plan.query_rows.tolist() == [0, 1, 2, 3, 5, 6, 7, 8, 11, 12]


# ------------------------------------------------------------------------------------ against reference


@pytest.mark.parametrize("backend", ["torch", "naive"])
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_matches_dense_reference_in_float64(case, backend):
    leaves, cu_seqlens = _inputs(case)
    expected = _run(naive_sf_attention, leaves, case, cu_seqlens)
    actual = _run(sf_attention, leaves, case, cu_seqlens, backend=backend)
    for name, got, ref in zip(("o", "dq", "dk", "dv"), actual, expected):
        assert got.shape == ref.shape, name
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10, msg=name)


@pytest.mark.parametrize("case", [CASES[5], CASES[9]], ids=_case_id)
def test_triton_interpreter_matches_reference_in_float32(case):
    pytest.importorskip("triton")
    leaves, cu_seqlens = _inputs(case)
    expected = _run(naive_sf_attention, leaves, case, cu_seqlens)
    actual = _run(sf_attention, leaves, case, cu_seqlens, dtype=torch.float32, backend="triton")
    for name, got, ref in zip(("o", "dq", "dk", "dv"), actual, expected):
        assert torch.isfinite(got).all(), name
        error = ((got - ref).abs().max() / ref.abs().max().clamp_min(1e-2)).item()
        assert error < 1e-4, (name, error)


def test_one_group_covering_the_row_is_full_causal_attention_and_default_scale():
    q, k, v = (torch.randn(2, 12, 4, 8, dtype=torch.float64) for _ in range(3))
    k, v = k[:, :, :2], v[:, :, :2]
    causal = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                            is_causal=True, enable_gqa=True).transpose(1, 2)
    # G >= 2T: both halves see one group per row (the shifted half's first group [0, G/2) covers it).
    torch.testing.assert_close(sf_attention(q, k, v, 24, sink=0), causal, rtol=1e-10, atol=1e-10)
    # A sink covering the row is full causal attention for any group size.
    torch.testing.assert_close(sf_attention(q, k, v, 2, sink=12), causal, rtol=1e-10, atol=1e-10)
    doubled = sf_attention(q, k, v, 4, sink=1, scale=2 * 8 ** -0.5)
    torch.testing.assert_close(doubled, naive_sf_attention(2 * q, k, v, 4, sink=1), rtol=1e-10, atol=1e-10)


# -------------------------------------------------------------------------------------------- behaviour


def _perturbed_outputs(position, variant, sink, length=32, group=8):
    q, k, v = (torch.randn(1, length, 4, 8, dtype=torch.float64) for _ in range(3))
    base = sf_attention(q, k, v, group, sink, variant=variant)
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    for x in (q2, k2, v2):
        x[:, position] += 3.0
    return base, sf_attention(q2, k2, v2, group, sink, variant=variant)


@pytest.mark.parametrize("position", [0, 3, 4, 17, 31])
def test_sf_is_strictly_causal(position):
    base, changed = _perturbed_outputs(position, "sf", sink=4)
    torch.testing.assert_close(changed[:, :position], base[:, :position], rtol=0, atol=1e-12)
    assert not torch.allclose(changed[:, position], base[:, position])


def test_s2_keeps_the_published_wrap_around_leak():
    """A change in the last G/2 tokens reaches the first G/2 outputs of the shifted heads (the future)."""
    base, changed = _perturbed_outputs(31, "s2", sink=0)
    plain, shifted = slice(0, 2), slice(2, 4)
    assert (changed[:, :4, shifted] - base[:, :4, shifted]).abs().amax() > 1e-3
    torch.testing.assert_close(changed[:, :31, plain], base[:, :31, plain], rtol=0, atol=1e-12)
    # The same change under "sf" leaves every earlier output alone.
    base, changed = _perturbed_outputs(31, "sf", sink=0)
    torch.testing.assert_close(changed[:, :31], base[:, :31], rtol=0, atol=1e-12)


def test_sink_tokens_are_visible_from_later_groups_of_their_document_only():
    q, k, v = (torch.randn(1, 24, 2, 8, dtype=torch.float64) for _ in range(3))
    cu = torch.tensor([0, 12, 24], dtype=torch.int32)
    v2 = v.clone()
    v2[:, 0] += 1.0  # the first sink token of document 0
    for sink, reaches in ((0, False), (1, True)):
        base = sf_attention(q, k, v, 4, sink, cu_seqlens=cu)
        changed = sf_attention(q, k, v2, 4, sink, cu_seqlens=cu)
        assert torch.allclose(changed[:, 8:12], base[:, 8:12]) is not reaches  # a later group, same document
        torch.testing.assert_close(changed[:, 12:], base[:, 12:], rtol=0, atol=0)  # the next document


# ---------------------------------------------------------------------------------------------- errors


def _good(**overrides):
    args = dict(q=torch.randn(1, 8, 4, 16), k=torch.randn(1, 8, 2, 16), v=torch.randn(1, 8, 2, 16), group_size=4)
    args.update(overrides)
    return args


@pytest.mark.parametrize("overrides, message", [
    (dict(q=torch.randn(1, 8, 3, 16), k=torch.randn(1, 8, 1, 16), v=torch.randn(1, 8, 1, 16)),
     "H=3 query heads must be even"),
    (dict(group_size=5), "group_size=5 must be an even int >= 2"),
    (dict(group_size=0), "group_size=0 must be an even int >= 2"),
    (dict(variant="s2"), "variant='s2'.*sink=4; pass sink=0"),
    (dict(variant="s3"), "variant='s3' is not one of"),
    (dict(sink=-1), "sink=-1 must be an int >= 0"),
    (dict(q=torch.randn(1, 8, 4, 16), k=torch.randn(1, 8, 3, 16), v=torch.randn(1, 8, 3, 16)),
     "with Hkv dividing H=4"),
    (dict(q=torch.randn(1, 8, 6, 16), k=torch.randn(1, 8, 4, 16), v=torch.randn(1, 8, 4, 16)),
     "with Hkv dividing H=6"),
    (dict(k=torch.randn(1, 8, 2, 8)), "k shape"),
    (dict(v=torch.randn(1, 7, 2, 16)), "v shape"),
    (dict(q=torch.randn(8, 4, 16)), "q must be a 4-D tensor"),
    (dict(cu_seqlens=torch.tensor([0, 3, 7], dtype=torch.int32)), "end at B\\*T=8"),
    (dict(cu_seqlens=torch.tensor([0, 6, 2, 8], dtype=torch.int32)), "non-decreasing"),
    (dict(cu_seqlens=torch.tensor([0, 8.0])), "int32 or int64"),
    (dict(q=torch.randn(2, 4, 4, 16), k=torch.randn(2, 4, 2, 16), v=torch.randn(2, 4, 2, 16),
          cu_seqlens=torch.tensor([0, 3, 8], dtype=torch.int32)), r"every row start b\*T \(T=4\), missing \[4\]"),
    (dict(backend="flash"), "backend='flash'"),
])
def test_bad_input_raises_a_clear_value_error(overrides, message):
    with pytest.raises(ValueError, match=message):
        sf_attention(**_good(**overrides))
