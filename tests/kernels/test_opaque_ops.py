"""Every kernel op is a `torch.library` custom op in the `lctrain` namespace: schema, fake implementation,
registered autograd and AOT dispatch checked by `torch.library.opcheck`; host offsets (`cu_seqlens_cpu`) give the
same result as the device offsets; gradients through the opaque op equal those of the plain implementation."""
import sys

import pytest
import torch
import torch.nn.functional as F

import lctrain.kernels  # noqa: F401  (registers the ops)
from lctrain.kernels.sf_attention import sf_attention

T, H, K, V = 11, 2, 4, 6
CU = torch.tensor([0, 4, 4, 11], dtype=torch.int32)  # an empty document in the middle
N = CU.numel() - 1


def _module(name):
    return sys.modules[f"lctrain.kernels.{name}"]


def _leaf(*shape, dtype, low=None):
    x = torch.randn(*shape, dtype=dtype)
    if low == "gate":
        x = -torch.rand(*shape, dtype=dtype)
    elif low == "unit":
        x = torch.rand(*shape, dtype=dtype) * 0.9 + 0.05
    return x.requires_grad_()


def _cases(dtype):
    q, k = _leaf(1, T, H, K, dtype=dtype), _leaf(1, T, H, K, dtype=dtype)
    v = _leaf(1, T, H, V, dtype=dtype)
    kn = F.normalize(k.detach(), dim=-1).requires_grad_()
    state = _leaf(N, H, K, V, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    taylor_state = _leaf(N, H, 1 + K + K * K, V + 1,
                         dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    gate, unit = _leaf(1, T, H, dtype=dtype, low="gate"), _leaf(1, T, H, dtype=dtype, low="unit")
    yield "gated_delta_rule", "_gdn_op", (q, kn, v, gate, unit, state, CU, CU, 0.5, True, "torch")
    yield "linear_attention", "_linear_op", (q, k, v, gate, state, CU, CU, 0.5, True, "torch")
    yield "linear_attention", "_linear_op", (q, k, v, None, None, None, None, 0.5, False, "torch")
    yield "taylor_linear_attention", "_taylor_op", (q, k, v, taylor_state, CU, CU, 0.5, True, 1e-6, True, "torch")
    yield "titans_memory", "_titans_op", (q, kn, v, unit, unit, unit, state, state.detach().clone().requires_grad_(),
                                          CU, CU, 3, True, "torch")
    yield "local_attention", "_local_op", (q, k, v, CU, CU, None, 3, None, 1, 0.5, "torch")
    yield "local_attention", "_local_op", (q, k, v, CU, CU, torch.tensor([2, 5]), 0, None, 2, 0.5, "naive")
    yield "landmark_attention", "_landmark_op", (q, k, v, CU, CU, 3, 0.5, "torch")
    yield "sf_attention", "_sf_op", (q, k, v, CU, CU, 4, 1, 0.5, "sf", "torch")


@pytest.mark.parametrize("dtype", [torch.float64, pytest.param(torch.float32, marks=pytest.mark.slow)])
def test_opcheck_every_op(dtype):
    seen = set()
    for module, attr, args in _cases(dtype):
        op = getattr(_module(module), attr)
        op = getattr(op, "op", op)
        seen.add(op._qualname if hasattr(op, "_qualname") else str(op))
        result = torch.library.opcheck(op, args)
        assert all(v == "SUCCESS" for v in result.values()), (module, result)
    assert len(seen) == 7


def test_ops_are_registered_in_the_lctrain_namespace():
    for name in ("gated_delta_rule", "linear_attention", "taylor_linear_attention", "titans_linear_memory",
                 "local_attention", "landmark_attention", "sf_attention"):
        assert hasattr(torch.ops.lctrain, name) and hasattr(torch.ops.lctrain, f"{name}_backward"), name


def test_host_offsets_equal_device_offsets_and_gradients_match_the_implementation():
    """Passing `cu_seqlens_cpu` (as the mixers do) changes nothing; the op's registered backward (recompute +
    autograd) gives the chunked implementation's own gradients."""
    from lctrain.kernels.gated_delta_rule import chunk_gated_delta_rule, gated_delta_rule

    q, k, v = (torch.randn(1, T, H, d, dtype=torch.float64, requires_grad=True) for d in (K, K, V))
    g = (-torch.rand(1, T, H, dtype=torch.float64)).requires_grad_()
    beta = torch.rand(1, T, H, dtype=torch.float64).requires_grad_()
    kn = F.normalize(k, dim=-1)
    o1, s1 = gated_delta_rule(q, kn, v, g, beta, output_final_state=True, cu_seqlens=CU, backend="torch")
    o2, s2 = gated_delta_rule(q, kn, v, g, beta, output_final_state=True, cu_seqlens=CU, cu_seqlens_cpu=CU.clone(),
                              backend="torch")
    assert torch.equal(o1, o2) and torch.equal(s1, s2)
    grads = torch.autograd.grad((o1 * o1).sum() + s1.sum(), (q, k, v, g, beta), retain_graph=True)
    o3, s3 = chunk_gated_delta_rule(q, kn, v, g, beta, K ** -0.5, None, True, CU)
    want = torch.autograd.grad((o3 * o3).sum() + s3.sum(), (q, k, v, g, beta))
    for a, b in zip(grads, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_without_recompute_eager_calls_run_the_implementation_once(monkeypatch):
    """Inside kernel_recompute(False), forward + backward runs the implementation once (its own autograd, nothing
    recomputed); by default, and through the registered op, it runs twice (forward, then the recompute in
    backward). Same gradients."""
    from lctrain.kernels.opaque import kernel_recompute

    gdn = _module("gated_delta_rule")
    calls = []
    real = gdn.chunk_gated_delta_rule

    def counted(*args):
        calls.append(torch.is_grad_enabled())
        return real(*args)

    monkeypatch.setattr(gdn, "chunk_gated_delta_rule", counted)
    q, k, v = (torch.randn(1, T, H, d, dtype=torch.float64, requires_grad=True) for d in (K, K, V))
    g = (-torch.rand(1, T, H, dtype=torch.float64)).requires_grad_()
    beta = torch.rand(1, T, H, dtype=torch.float64).requires_grad_()
    kn = F.normalize(k, dim=-1)
    leaves = (q, k, v, g, beta)
    args = (q, kn, v, g, beta, None, CU, CU, 0.5, True, "torch")
    results = {}
    for name, fn, recompute in (("eager", gdn._gdn_op, False), ("op", gdn._gdn_op.op, False),
                                 ("default", gdn._gdn_op, True)):
        calls.clear()
        with kernel_recompute(recompute):
            o, s = fn(*args)
        results[name] = torch.autograd.grad((o * o).sum() + s.sum(), leaves, retain_graph=True)
        results[name + "_calls"] = list(calls)
    assert results["eager_calls"] == [True]            # once, under autograd
    assert results["op_calls"] == [False, True]        # forward without a graph, recompute in backward
    assert results["default_calls"] == [False, True]
    for other in ("op", "default"):
        for a, b in zip(results["eager"], results[other]):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_bad_host_offsets_are_one_line_errors():
    from lctrain.kernels import linear_attention

    q = torch.randn(1, T, H, K)
    with pytest.raises(ValueError, match="cu_seqlens_cpu must be on the CPU|cu_seqlens_cpu shape"):
        linear_attention(q, q, q, cu_seqlens=CU, cu_seqlens_cpu=CU[:-1])
    with pytest.raises(ValueError, match="non-decreasing"):
        linear_attention(q, q, q, cu_seqlens_cpu=torch.tensor([0, 6, 3, 11], dtype=torch.int32))
    with pytest.raises(ValueError, match="cu_seqlens_cpu must be an int32 or int64"):
        linear_attention(q, q, q, cu_seqlens=CU, cu_seqlens_cpu=CU.float())


def test_sf_attention_host_plan_equals_device_plan():
    q, k, v = (torch.randn(1, T, 4, 4, dtype=torch.float64) for _ in range(3))
    a = sf_attention(q, k, v, group_size=4, sink=1, cu_seqlens=CU, backend="torch")
    b = sf_attention(q, k, v, group_size=4, sink=1, cu_seqlens=CU, cu_seqlens_cpu=CU, backend="torch")
    assert torch.equal(a, b)
