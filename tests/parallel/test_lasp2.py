"""LASP-2 on 2 and 4 gloo processes: outputs and all gradients equal the single-process op (float64)."""
import pytest

from tests.parallel import cases_lasp2
from tests.parallel.conftest import WORLD_SIZES
from tests.parallel.harness import assert_case

CASE_MODULE = "tests.parallel.cases_lasp2"


@pytest.mark.parametrize("world", WORLD_SIZES)
@pytest.mark.parametrize("case", sorted(cases_lasp2.CASES))
def test_lasp2(sp_report, world, case):
    assert_case(sp_report, world, CASE_MODULE, case)
