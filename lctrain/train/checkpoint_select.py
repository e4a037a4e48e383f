"""Which checkpoint to use: the newest one that verifies, whatever `latest` says.

`checkpoints/latest` is only a hint: a kill, a full disk or a second writer can leave it naming a missing,
partial or corrupt directory. Checkpoints are ordered by when they were written (the manifest's `generation`,
then the step), and the first whose manifest verifies wins. Directories written before manifests existed are
accepted, after the verified ones, when their files are present, and said to be unverified.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from lctrain.config import ConfigError
from lctrain.train.manifest import MANIFEST, read_manifest, verify

LATEST = "latest"


class CheckpointError(ConfigError):
    """No usable checkpoint where one is expected; one line naming the directories and why (exit code 2)."""


def step_dirs(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return [p for p in root.iterdir() if p.name.startswith("step-") and p.name[5:].isdigit() and p.is_dir()]


def write_order(path: Path) -> tuple[int, int]:
    """Sort key, larger = written later: (manifest generation, step); no manifest counts as oldest."""
    manifest = read_manifest(path)
    generation = manifest.get("generation", -1) if manifest else -1
    return (generation if isinstance(generation, int) else -1, int(path.name[5:]))


def newest_first(root: Path) -> list[Path]:
    return sorted(step_dirs(root), key=write_order, reverse=True)


def latest_hint(root: Path) -> str | None:
    try:
        return (root / LATEST).read_text().strip() or "(empty)"
    except (OSError, UnicodeDecodeError):
        return None if not (root / LATEST).exists() else "(unreadable)"


def trainer_json_problem(path: Path) -> str | None:
    try:
        state = json.loads((path / "trainer.json").read_text())
    except FileNotFoundError:
        return "trainer.json is missing"
    except (OSError, ValueError) as exc:
        return f"trainer.json is not readable JSON ({type(exc).__name__})"
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        return "trainer.json has no step"
    return None


def resumable_legacy(path: Path) -> str | None:
    """A checkpoint without a manifest is usable for resuming when its trainer state and weights are there."""
    problem = trainer_json_problem(path)
    if problem:
        return problem
    has_weights = any((path / n).is_file() for n in ("model.safetensors", "adapter.safetensors")) or \
        any(p.is_dir() for p in path.iterdir())
    return None if has_weights else "no weights file"


def weights_legacy(path: Path) -> str | None:
    """For loading weights only (export, eval, init_from)."""
    return None if any((path / n).is_file() for n in ("model.safetensors", "adapter.safetensors")) \
        else "no model.safetensors"


@dataclass
class Selection:
    path: Path | None  # None: no checkpoint directory at all
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (directory name, why), newest first
    unverified: bool = False  # chosen directory predates manifests
    hint: str | None = None  # what `latest` named

    def notes(self) -> list[str]:
        """One line per newer checkpoint that was passed over, then one if the chosen one is unverified."""
        lines = [f"checkpoint {name} skipped: {why}" for name, why in self.skipped]
        if self.path is not None and self.unverified:
            lines.append(f"checkpoint {self.path.name} has no {MANIFEST} (written before manifests): its files "
                         "are not verified")
        if self.path is not None and self.hint not in (None, self.path.name) and not self.skipped:
            lines.append(f"checkpoints/latest names {self.hint}; the newest complete checkpoint is {self.path.name}")
        return lines


def select(root: Path, legacy_ok: Callable[[Path], str | None] = resumable_legacy) -> Selection:
    """The newest checkpoint under `root` that verifies (see the module docstring). Raises CheckpointError when
    checkpoints exist (or `latest` names one) and none is usable."""
    hint = latest_hint(root)
    skipped = []
    for path in newest_first(root):  # directories without a manifest sort after every one with
        if (path / MANIFEST).is_file():
            problem = verify(path)
            if problem is None and legacy_ok is resumable_legacy:
                problem = trainer_json_problem(path)
            if problem is None:
                # directories without a manifest sort as oldest; one with a higher step is still worth a word
                unfinished = [(p.name, f"no {MANIFEST} (the save did not finish, or it predates manifests)")
                              for p in step_dirs(root) if not (p / MANIFEST).is_file() and
                              int(p.name[5:]) > int(path.name[5:])]
                return Selection(path, skipped + sorted(unfinished, reverse=True), False, hint)
        else:
            problem = legacy_ok(path)
            if problem is None:
                return Selection(path, skipped, True, hint)
            problem = f"no {MANIFEST} and {problem}"
        skipped.append((path.name, problem))
    if skipped:
        raise CheckpointError(f"no usable checkpoint in {root}: " + "; ".join(f"{n}: {w}" for n, w in skipped) +
                              " (move them aside, or set checkpoint.resume=false to start again from step 0)")
    if hint is not None:
        raise CheckpointError(f"{root / LATEST} names {hint} but there is no checkpoint directory (set "
                              "checkpoint.resume=false to start again from step 0)")
    return Selection(None, [], False, hint)
