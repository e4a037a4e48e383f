"""sp halo on 2 and 4 gloo processes, float64, against the single-process reference (4 processes with -m slow:
the 4-rank cases share one ~22 s process group; the exchange is the same code as on 2)."""
import pytest

from tests.parallel import cases_halo
from tests.parallel.conftest import WORLD_SIZES
from tests.parallel.harness import assert_case

CASE_MODULE = "tests.parallel.cases_halo"


@pytest.mark.parametrize("world", [pytest.param(w, marks=pytest.mark.slow) if w == 4 else w for w in WORLD_SIZES])
@pytest.mark.parametrize("case", sorted(cases_halo.CASES))
def test_halo(sp_report, world, case):
    assert_case(sp_report, world, CASE_MODULE, case)
