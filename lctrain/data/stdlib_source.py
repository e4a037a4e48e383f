"""The embedded default corpus: the Python standard library's own source files.

Every Python installation ships its standard library as readable `.py` files, so a recipe that names no data can
still train on real, varied text with no network and nothing for the user to fetch. The corpus is the `*.py` files
under `sysconfig.get_paths()["stdlib"]`, sorted by their path relative to that directory, one file per document.
Test suites, IDLE, demos and anything installed by third parties are left out: test files are huge, repetitive and
unlike the rest, and installed packages differ from machine to machine.

The documents therefore depend on the Python version (3.11 and 3.12 ship different files); the cache fingerprint
includes every file's relative path and size, so a different interpreter gets its own tokenised cache.
"""
from __future__ import annotations

import os
import sysconfig
from pathlib import Path
from typing import Iterator

# Any path component with one of these names excludes the file (tests, IDEs, demos, third-party packages, caches).
EXCLUDED_PARTS = frozenset({
    "test", "tests", "idle_test", "idlelib", "turtledemo", "site-packages", "dist-packages", "__pycache__",
    "lib2to3", "__phello__",
})


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(limit: int = 0) -> list[Path]:
    """Sorted standard-library `.py` files (all of them, or the first `limit` when limit > 0)."""
    root = stdlib_root()
    found = []
    for directory, subdirs, names in os.walk(root):
        # Prune while walking: site-packages alone can hold tens of thousands of files.
        subdirs[:] = [d for d in subdirs if d not in EXCLUDED_PARTS]
        for name in names:
            path = Path(directory) / name
            # Empty files (many `__init__.py`) would be documents without text.
            if name.endswith(".py") and path.is_file() and path.stat().st_size > 0:
                found.append(path.relative_to(root).as_posix())
    found.sort()
    if limit > 0:
        found = found[:limit]
    return [root / name for name in found]


def stdlib_fingerprint_items(limit: int = 0) -> list[tuple[str, int]]:
    """(relative path, size in bytes) per document, in document order: what the cache key hashes."""
    root = stdlib_root()
    return [(path.relative_to(root).as_posix(), path.stat().st_size) for path in stdlib_files(limit)]


def iter_stdlib_documents(limit: int = 0) -> Iterator[str]:
    """One document per file; undecodable bytes are replaced so no installation can break the default corpus."""
    for path in stdlib_files(limit):
        yield path.read_text(encoding="utf-8", errors="replace")
