"""sp attention on 2 and 4 gloo processes, float64, against the single-process reference."""
import pytest

from tests.parallel import cases_attention
from tests.parallel.conftest import WORLD_SIZES
from tests.parallel.harness import assert_case

CASE_MODULE = "tests.parallel.cases_attention"


def _params():
    """Every case on 2 processes by default and on 4 with -m slow (the same code; 4-rank SP stays in the default
    run through tests/parallel/test_training_sp.py)."""
    for case in sorted(cases_attention.CASES):
        for world in WORLD_SIZES:
            slow = world == 4  # the 4-rank cases share one process group: ~21 s together
            yield pytest.param(case, world, marks=pytest.mark.slow) if slow else (case, world)


@pytest.mark.parametrize("case,world", _params())
def test_attention(sp_report, world, case):
    assert_case(sp_report, world, CASE_MODULE, case)
