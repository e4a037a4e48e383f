"""Failures that end a run with one line for the user (the CLI prints `error: training aborted: ...`, exit 1)."""
from __future__ import annotations


class TrainingAborted(RuntimeError):
    """Training cannot go on (e.g. too many non-finite steps in a row); the message is one line for the user."""


class CheckpointSaveError(TrainingAborted):
    """A save failed: the message names the step, the path and the cause; `latest` still names the last good one."""


class CollectiveTimeout(TrainingAborted):
    """A collective did not complete within parallel.timeout_s; the message names the ranks that did not arrive."""
