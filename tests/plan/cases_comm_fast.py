"""The default-run subset of `cases_comm` (one gloo spawn per world size runs only these)."""
from tests.plan.cases_comm import FAST as CASES  # noqa: F401
