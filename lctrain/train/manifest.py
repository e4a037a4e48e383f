"""The manifest that ends every checkpoint: each file's size and SHA-256, written last, checked before a resume.

`manifest.json` in `step-<N>/`:

    {"version": 1, "step": N, "generation": G, "files": {"model.safetensors": {"size": ..., "sha256": ...}, ...}}

Paths are relative to the checkpoint directory and include every file below it (so the shards an engine writes
into a subdirectory through `collective_write` are covered too). `generation` counts saves in this checkpoints
directory (one more than the newest manifest already there): it orders checkpoints by when they were written,
which the step number does not when an older run left higher-numbered directories behind.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

MANIFEST = "manifest.json"
VERSION = 1
_CHUNK = 1 << 22


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while True:
            block = handle.read(_CHUNK)
            if not block:
                break
            digest.update(block)
    return digest.hexdigest()


def _files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)


def build_manifest(directory: Path, step: int, generation: int) -> dict:
    files = {}
    for path in _files(directory):
        files[path.relative_to(directory).as_posix()] = {"size": path.stat().st_size, "sha256": file_digest(path)}
    return {"version": VERSION, "step": step, "generation": generation, "files": files}


def write_manifest(directory: Path, step: int, generation: int) -> dict:
    """Hash every file under `directory` and write the manifest (fsynced) as the last file of the checkpoint."""
    manifest = build_manifest(directory, step, generation)
    target = directory / MANIFEST
    with open(target, "w") as handle:
        json.dump(manifest, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    return manifest


def read_manifest(directory: Path) -> dict | None:
    """The parsed manifest, or None when there is none or it is not readable."""
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        return None
    return manifest


def verify(directory: Path) -> str | None:
    """None when every file the manifest lists is there with its size and checksum; otherwise why not (one
    phrase naming the file). Sizes are compared first, so a truncated file is found without hashing."""
    if not directory.is_dir():
        return "not a directory"
    if not (directory / MANIFEST).is_file():
        return f"no {MANIFEST} (the save did not finish, or it predates manifests)"
    manifest = read_manifest(directory)
    if manifest is None:
        return f"{MANIFEST} is not readable"
    files = manifest["files"]
    for name, entry in files.items():
        path = directory / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != entry.get("size"):
            return f"{name} has {size} bytes, the manifest says {entry.get('size')}"
    for name, entry in files.items():
        if file_digest(directory / name) != entry.get("sha256"):
            return f"{name} does not match its checksum"
    return None
