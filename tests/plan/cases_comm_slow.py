"""The rest of `cases_comm`, run with `-m slow`."""
from tests.plan.cases_comm import SLOW as CASES  # noqa: F401
