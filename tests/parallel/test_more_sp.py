"""Taylor (BASED), sliding-window, Titans and landmark SP on 2 and 4 gloo processes: outputs and all gradients
equal the single-process result; whole-model cases for hybrids of those mixers."""
import pytest

from tests.parallel import cases_more_sp
from tests.parallel.conftest import WORLD_SIZES
from tests.parallel.harness import assert_case

CASE_MODULE = "tests.parallel.cases_more_sp"


@pytest.mark.parametrize("world", WORLD_SIZES)
@pytest.mark.parametrize("case", sorted(cases_more_sp.CASES))
def test_more_sp(sp_report, world, case):
    assert_case(sp_report, world, CASE_MODULE, case)
