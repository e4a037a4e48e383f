"""sp attention on 2 and 4 gloo processes, float64, against the single-process reference."""
import pytest

from tests.parallel import cases_attention
from tests.parallel.conftest import WORLD_SIZES
from tests.parallel.harness import assert_case

CASE_MODULE = "tests.parallel.cases_attention"


@pytest.mark.parametrize("world", WORLD_SIZES)
@pytest.mark.parametrize("case", sorted(cases_attention.CASES))
def test_attention(sp_report, world, case):
    assert_case(sp_report, world, CASE_MODULE, case)
