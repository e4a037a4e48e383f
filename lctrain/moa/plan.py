"""MoA plan files: one elastic rule (alpha, beta) per attention head, as JSON.

    {"format": "lctrain-moa-plan", "version": 1, "sink": 64, "n_heads": H,
     "layers": {"<layer index>": [[alpha, beta], ...one per head]},
     "density": target or null, "lengths": [...], "summary": {...}}

A layer without an entry keeps dense attention. Bad files raise `ConfigError` (a `ValueError`) with one line
naming the path and the problem.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Iterable

import torch

from lctrain.config import ConfigError
from lctrain.moa.rules import DEFAULT_SINK, Rule

__all__ = ["PLAN_FORMAT", "PLAN_VERSION", "save_plan", "load_plan", "validate_plan", "head_windows", "head_rules",
           "plan_sink", "uniform_plan", "dense_plan"]

PLAN_FORMAT = "lctrain-moa-plan"
PLAN_VERSION = 1


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def validate_plan(plan, where: str = "moa plan", n_layers: int | None = None, n_heads: int | None = None) -> dict:
    """Check the structure of a plan dict; raise `ConfigError` prefixed with `where` on the first problem."""
    if not isinstance(plan, dict):
        raise ConfigError(f"{where}: expected a JSON object, got {type(plan).__name__}")
    if plan.get("format") != PLAN_FORMAT:
        raise ConfigError(f"{where}: format is {plan.get('format')!r}, expected {PLAN_FORMAT!r}")
    if plan.get("version") != PLAN_VERSION:
        raise ConfigError(f"{where}: version {plan.get('version')!r} is not supported (expected {PLAN_VERSION})")
    sink = plan.get("sink")
    if not _is_int(sink) or sink < 0:
        raise ConfigError(f"{where}: sink must be an integer >= 0, got {sink!r}")
    heads = plan.get("n_heads")
    if not _is_int(heads) or heads < 1:
        raise ConfigError(f"{where}: n_heads must be an integer >= 1, got {heads!r}")
    if n_heads is not None and heads != n_heads:
        raise ConfigError(f"{where}: plan has n_heads={heads} but the model has {n_heads} attention heads")
    layers = plan.get("layers")
    if not isinstance(layers, dict):
        raise ConfigError(f"{where}: layers must be an object mapping layer index -> per-head rules")
    for key, rules in layers.items():
        try:
            idx = int(key)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: layer key {key!r} is not an integer") from None
        if str(idx) != str(key) or idx < 0:
            raise ConfigError(f"{where}: layer key {key!r} must be a non-negative integer")
        if n_layers is not None and idx >= n_layers:
            raise ConfigError(f"{where}: layer {idx} is out of range for a model with {n_layers} layers")
        if not isinstance(rules, list) or len(rules) != heads:
            got = len(rules) if isinstance(rules, list) else type(rules).__name__
            raise ConfigError(f"{where}: layer {idx} has {got} head rules, expected n_heads={heads}")
        for h, rule in enumerate(rules):
            if not isinstance(rule, (list, tuple)) or len(rule) != 2 or not all(_is_num(v) for v in rule):
                raise ConfigError(f"{where}: layer {idx} head {h}: rule must be [alpha, beta] numbers, got {rule!r}")
            if rule[0] < 0 or rule[1] < 0:
                raise ConfigError(f"{where}: layer {idx} head {h}: alpha and beta must be >= 0, got {list(rule)}")
    target = plan.get("density")
    if target is not None and (not _is_num(target) or not 0 < target <= 1):
        raise ConfigError(f"{where}: density must be null or a number in (0, 1], got {target!r}")
    lengths = plan.get("lengths", [])
    if not isinstance(lengths, list) or not all(_is_int(n) and n >= 1 for n in lengths):
        raise ConfigError(f"{where}: lengths must be a list of positive integers, got {lengths!r}")
    if not isinstance(plan.get("summary", {}), dict):
        raise ConfigError(f"{where}: summary must be an object")
    return plan


def save_plan(plan: dict, path) -> Path:
    """Validate and write `plan` as JSON at `path` atomically (temp file in the same directory + os.replace)."""
    path = Path(path)
    validate_plan(plan, f"moa plan {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(plan, f, indent=1)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def load_plan(path, n_layers: int | None = None, n_heads: int | None = None) -> dict:
    """Read and validate a plan; `n_layers` / `n_heads` check it against a model. Raises `ConfigError`."""
    where = f"moa plan {path}"
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{where}: file not found")
    try:
        plan = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{where}: not valid JSON ({str(exc).splitlines()[0]})") from None
    return validate_plan(plan, where, n_layers, n_heads)


def plan_sink(plan: dict) -> int:
    return int(plan["sink"])


def head_rules(plan: dict, layer_idx: int) -> list[Rule] | None:
    """The per-head rules of layer `layer_idx`, or None when the plan leaves that layer dense."""
    rules = plan["layers"].get(str(int(layer_idx)))
    return None if rules is None else [Rule(float(a), float(b)) for a, b in rules]


def head_windows(plan: dict, layer_idx: int, n: int) -> torch.Tensor | None:
    """Int64 `[H]` per-head windows of layer `layer_idx` at input length `n`, or None (no entry: dense)."""
    rules = head_rules(plan, layer_idx)
    if rules is None:
        return None
    return torch.tensor([r.window(n) for r in rules], dtype=torch.long)


def _layer_list(layers: int | Iterable[int]) -> list[int]:
    return list(range(layers)) if _is_int(layers) else [int(i) for i in layers]


def uniform_plan(rule: Rule, layers: int | Iterable[int], n_heads: int, sink: int = DEFAULT_SINK) -> dict:
    """A plan giving every head of every listed layer (an int means range(layers)) the same `rule`."""
    plan = {"format": PLAN_FORMAT, "version": PLAN_VERSION, "sink": int(sink), "n_heads": int(n_heads),
            "layers": {str(i): [[float(rule.alpha), float(rule.beta)] for _ in range(n_heads)]
                       for i in _layer_list(layers)},
            "density": None, "lengths": [], "summary": {}}
    return validate_plan(plan)


def dense_plan(layers: int | Iterable[int], n_heads: int, sink: int = DEFAULT_SINK) -> dict:
    """Every head dense (alpha 0, beta 1)."""
    return uniform_plan(Rule(0.0, 1.0), layers, n_heads, sink)
