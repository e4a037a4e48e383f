"""sp attention through the Triton kernels (interpreter, fp32) on 2 and 4 gloo processes (slow)."""
import pytest

from tests.parallel import cases_attention_triton
from tests.parallel.conftest import WORLD_SIZES
from tests.parallel.harness import assert_case

CASE_MODULE = "tests.parallel.cases_attention_triton"


@pytest.mark.slow
@pytest.mark.parametrize("world", WORLD_SIZES)
@pytest.mark.parametrize("case", sorted(cases_attention_triton.CASES))
def test_attention_triton(sp_report, world, case):
    assert_case(sp_report, world, CASE_MODULE, case)
