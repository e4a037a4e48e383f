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

pytestmark = pytest.mark.skipif(not kernels.utils.triton_interpreting(), reason="needs TRITON_INTERPRET=1")

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
