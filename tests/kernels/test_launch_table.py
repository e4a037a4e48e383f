"""Launch = AOT: every Triton kernel launch an op makes (forward and backward) uses a configuration that the
ahead-of-time check compiles — same kernel, block sizes, num_warps and num_stages — so the spill and
shared-memory verdicts of `lctrain.kernels.aot` are about what actually runs. Launches are recorded in the
Triton interpreter (this suite sets TRITON_INTERPRET=1)."""
from importlib import import_module

import pytest
import torch
import torch.nn.functional as F

from lctrain import kernels
from lctrain.kernels import aot

INTERPRETED = pytest.mark.skipif(not kernels.utils.triton_interpreting(), reason="needs TRITON_INTERPRET=1")

DEFAULT_STAGES = 3  # Triton's num_stages when a launch does not pass one


@pytest.fixture
def launches(monkeypatch):
    from triton.runtime.interpreter import InterpretedFunction

    seen = []
    original = InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        seen.append((self.fn.__name__, dict(kwargs), tuple(grid)))
        return original(self, *args, grid=grid, warmup=warmup, **kwargs)

    monkeypatch.setattr(InterpretedFunction, "run", run)
    return seen


def _specs_by_kernel(dtype):
    table = {}
    for module in aot.AOT_MODULES:
        for spec in import_module(module).aot_specs(dtype):
            table.setdefault(spec.kernel.__name__, []).append(spec)
    return table


def _matches(spec, kwargs) -> bool:
    if spec.num_warps != kwargs.get("num_warps", 4) or spec.num_stages != kwargs.get("num_stages", DEFAULT_STAGES):
        return False
    # optional-state flags are compiled switched on (the variant with most live registers); sizes must be equal
    return all(kwargs[key] == value for key, value in spec.constexprs.items()
               if key in kwargs and not isinstance(value, bool))


def _run_ops():
    T, H, K, V = 37, 2, 16, 32
    cu = torch.tensor([0, 20, 37], dtype=torch.int32)
    leaf = lambda *s: torch.randn(*s).requires_grad_()  # noqa: E731
    q, k, v = leaf(1, T, H, K), leaf(1, T, H, K), leaf(1, T, H, V)
    kn = F.normalize(k, dim=-1)
    gate = (-torch.rand(1, T, H)).requires_grad_()
    unit = (torch.rand(1, T, H) * 0.5 + 0.2).requires_grad_()
    outs = [
        kernels.gated_delta_rule(q, kn, v, gate, unit, output_final_state=True, cu_seqlens=cu, backend="triton")[0],
        kernels.linear_attention(q, k, v, gate, cu_seqlens=cu, backend="triton")[0],
        kernels.titans_linear_memory(q, kn, v, unit, unit, unit, chunk_size=8, cu_seqlens=cu, backend="triton")[0],
        kernels.local_attention(q, k, v, 5, sink=2, cu_seqlens=cu, backend="triton"),
        kernels.landmark_attention(q, k, v, 4, cu_seqlens=cu, backend="triton"),
        kernels.taylor_linear_attention(q[..., :8], k[..., :8], v, cu_seqlens=cu, backend="triton")[0],
    ]
    sum(o.float().square().sum() for o in outs).backward()


@INTERPRETED
@pytest.mark.slow
def test_every_launch_is_an_aot_checked_configuration(launches):
    _run_ops()
    table = _specs_by_kernel("fp32")
    assert len({name for name, _, _ in launches}) >= 20  # forward and backward kernels of all six ops
    for name, kwargs, grid in launches:
        assert name in table, f"{name} is launched but not registered with the AOT check"
        assert any(_matches(spec, kwargs) for spec in table[name]), (
            f"{name} launched with num_warps={kwargs.get('num_warps')}, num_stages={kwargs.get('num_stages')}, "
            f"{ {k: v for k, v in kwargs.items() if k.isupper()} } — not among its AOT specs")


@INTERPRETED
@pytest.mark.slow
def test_launch_grids_equal_the_launchers(launches):
    """`kernels.grids.launch_grids` is what the launchers use: checked against every recorded launch."""
    from lctrain.kernels.grids import launch_grids

    _run_ops()
    want = {}
    for op, dims, opts in (("gated_delta_rule", (16, 32), {}), ("linear_attention", (16, 32), {}),
                           ("titans_linear_memory", (16, 32), {"chunk_size": 8}), ("local_attention", (16, 32), {}),
                           ("landmark_attention", (16, 32), {"block_size": 4}),
                           ("taylor_linear_attention", (8, 32), {})):
        want.update(launch_grids(op, [20, 17], 2, *dims, "fp32", **opts))
    for name, _, grid in launches:
        assert tuple(grid) + (1,) * (3 - len(grid)) == want[name] + (1,) * (3 - len(want[name])), name


def test_launch_grids_fit_cuda_limits_at_4m_tokens():
    """At T = 4M tokens and H = 64 every grid axis of every kernel is within CUDA's limits: one 4M-token document,
    70,000 short documents (documents x heads = 4.5M, past the 65,535 of axes 1-2), and one long document packed
    with 69,999 short ones; the launch-time check accepts them all."""
    from lctrain.kernels.grids import grid_violations, launch_grids
    from lctrain.kernels.utils import check_triton_documents

    tokens, heads, docs = 4 * 2**20, 64, 70_000
    short = tokens // docs
    cases = (("gated_delta_rule", (128, 256), {}), ("linear_attention", (128, 128), {}),
             ("titans_linear_memory", (128, 128), {"chunk_size": 16}), ("taylor_linear_attention", (16, 128), {}),
             ("local_attention", (128, 128), {}), ("landmark_attention", (128, 128), {"block_size": 64}))
    batches = ([tokens], [short] * (docs - 1) + [tokens - short * (docs - 1)],
               [tokens - (docs - 1)] + [1] * (docs - 1))
    for lengths in batches:
        assert sum(lengths) == tokens
        check_triton_documents("local_attention", len(lengths), heads)
        for op, dims, opts in cases:
            grids = launch_grids(op, lengths, heads, *dims, "bf16", **opts)
            assert grids and not grid_violations(grids), (op, len(lengths), grid_violations(grids))
    # the large dimensions are on axis 0: the 70,000-document batch has more programs there than axis 1 allows
    grids = {}
    for op, dims, opts in cases:
        grids.update(launch_grids(op, batches[1], heads, *dims, "bf16", **opts))
    for name in ("linear_attention_fwd_kernel", "taylor_fwd_kernel", "local_attention_fwd_kernel",
                 "landmark_fwd_kernel", "landmark_bwd_dkv_kernel"):
        assert grids[name][0] > 65535, name


def test_only_impossible_batches_are_refused():
    from lctrain.kernels.utils import check_triton_documents

    check_triton_documents("local_attention", 1_000_000, 64)
    with pytest.raises(ValueError, match="at most 65535 heads"):
        check_triton_documents("landmark_attention", 1, 65536)
    with pytest.raises(ValueError, match="documents x heads"):
        check_triton_documents("linear_attention", 2**26, 64)
