"""A tiny hybrid LM under sequence parallelism (sp = world, and dp 2 x sp 2) equals the single-device model."""
import pytest

from tests.parallel import cases_model
from tests.parallel.conftest import WORLD_SIZES
from tests.parallel.harness import assert_case

CASE_MODULE = "tests.parallel.cases_model"


@pytest.mark.parametrize("world", WORLD_SIZES)
@pytest.mark.parametrize("case", sorted(cases_model.CASES))
def test_model_under_sp(sp_report, world, case):
    assert_case(sp_report, world, CASE_MODULE, case)
