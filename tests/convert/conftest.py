"""Fixtures shared with the export tests."""
from tests.export.conftest import tokenizer  # noqa: F401
