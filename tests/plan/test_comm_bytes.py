"""Planned SP bytes equal the bytes counted in real gloo runs (sp = 2 and 4, every attention mode and layout,
with and without activation checkpointing, dp 2 x sp 2, float64): per layer type, on every rank."""
import pytest

from tests.parallel.harness import run_cases
from tests.plan import cases_comm

_cache = {}


def _report(module: str, world: int) -> dict:
    if (module, world) not in _cache:
        _cache[module, world] = run_cases(world, [module], tag=f"tests/plan/{module}")
    return _cache[module, world]


def _check(module: str, world: int, case: str) -> None:
    per_rank = _report(module, world)[f"{module}:{case}"]
    failures = [f"rank {rank}:\n{msg}" for rank, msg in enumerate(per_rank) if msg != "ok"]
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("world", (2, pytest.param(4, marks=pytest.mark.slow)))  # 4: ~10 s, same counting code
@pytest.mark.parametrize("case", sorted(cases_comm.FAST))
def test_planned_bytes_equal_counted(world, case):
    _check("tests.plan.cases_comm_fast", world, case)


@pytest.mark.slow
@pytest.mark.parametrize("world", (2, 4))
@pytest.mark.parametrize("case", sorted(cases_comm.SLOW))
def test_planned_bytes_equal_counted_full_grid(world, case):
    _check("tests.plan.cases_comm_slow", world, case)
