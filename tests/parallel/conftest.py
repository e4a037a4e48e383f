"""One spawn of gloo processes per world size for the whole folder; each test looks up its case's report."""
import pytest

from tests.parallel.harness import run_cases

WORLD_SIZES = (2, 4)


@pytest.fixture(scope="session")
def sp_report(request):
    """`sp_report(world, module, case) -> [per-rank report]`, running the selected case modules once per world."""
    selected = sorted({getattr(item.module, "CASE_MODULE") for item in request.session.items
                       if item.module is not None and hasattr(item.module, "CASE_MODULE")})
    cache = {}

    def lookup(world: int, module: str, case: str) -> list[str]:
        if world not in cache:
            cache[world] = run_cases(world, selected, tag="tests/parallel")
        return cache[world][f"{module}:{case}"]
    return lookup

