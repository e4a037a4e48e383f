"""Elastic attention rules: window(N) = alpha + beta * N tokens of sliding window plus a fixed attention sink.

The mask semantics are those of `lctrain.kernels.local_attention`: query i sees key j iff j <= i and
(i - j < window or j < sink).
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Iterable

import torch

__all__ = ["Rule", "DEFAULT_ALPHAS", "DEFAULT_BETAS", "DEFAULT_SINK", "parse_grid", "density", "rule_density",
           "rule_mask"]

DEFAULT_SINK = 64
DEFAULT_ALPHAS = (0.0, 64.0, 128.0, 256.0, 512.0, 1024.0)
DEFAULT_BETAS = (0.0, 0.125, 0.25, 0.5, 0.75, 1.0)  # beta = 1 makes the dense rule (alpha 0, beta 1) available


@dataclass(frozen=True)
class Rule:
    """Span rule of one head: `alpha + beta * N` tokens of sliding window at input length N."""

    alpha: float
    beta: float

    def window(self, n: int) -> int:
        """Window at length `n`: alpha + beta * n rounded half up, at least 1, at most n (n means dense)."""
        if n < 1:
            raise ValueError(f"Rule.window: length must be >= 1, got {n}")
        return min(int(n), max(1, math.floor(self.alpha + self.beta * n + 0.5)))

    def is_dense(self, n: int, sink: int = 0) -> bool:
        """True when the rule admits every causal pair at length `n` (window >= n, or window + sink >= n)."""
        return self.window(n) + max(0, int(sink)) >= n

    def as_list(self) -> list[float]:
        return [float(self.alpha), float(self.beta)]

    def __str__(self) -> str:
        return f"{_fmt(self.alpha)}+{_fmt(self.beta)}N"


def _fmt(x: float) -> str:
    return f"{x:g}"


def _check_value(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"moa rule grid: {name} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"moa rule grid: {name} must be a finite number >= 0, got {value!r}")
    return value


def parse_grid(alphas: Iterable[float] = DEFAULT_ALPHAS, betas: Iterable[float] = DEFAULT_BETAS) -> list[Rule]:
    """Every (alpha, beta) combination as a `Rule`, in order (alpha-major), duplicates dropped."""
    alphas = [_check_value("alpha", a) for a in alphas]
    betas = [_check_value("beta", b) for b in betas]
    if not alphas or not betas:
        raise ValueError("moa rule grid: need at least one alpha and one beta")
    rules, seen = [], set()
    for a, b in itertools.product(alphas, betas):
        rule = Rule(a, b)
        if rule not in seen:
            seen.add(rule)
            rules.append(rule)
    return rules


def _admitted_pairs(window: int, sink: int, n: int) -> int:
    """Number of causal (i, j) pairs, 0 <= j <= i < n, with i - j < window or j < sink.

    Query i admits (i + 1 - b) band keys, b = max(0, i - window + 1), plus min(sink, b) sink keys left of the band.
    Rows i < window are full: sum (i + 1). Row i >= window: window + min(sink, i - window + 1).
    """
    w = min(window, n)
    full = w * (w + 1) // 2
    m = n - w  # rows with a cut band
    s = min(sink, m)
    sink_part = s * (s + 1) // 2 + (m - s) * sink
    return full + m * w + sink_part


def density(window: int, sink: int, n: int) -> float:
    """Fraction of the n(n+1)/2 causal query-key pairs admitted by a `window` + `sink` mask at length n."""
    window, sink, n = int(window), int(sink), int(n)
    if n < 1 or window < 1 or sink < 0:
        raise ValueError(f"moa density: need n >= 1, window >= 1, sink >= 0; got n={n}, window={window}, "
                         f"sink={sink}")
    return _admitted_pairs(window, sink, n) / (n * (n + 1) // 2)


def rule_density(rule: Rule, sink: int, n: int) -> float:
    """`density` of `rule` at length n."""
    return density(rule.window(n), sink, n)


def rule_mask(rule: Rule, sink: int, n: int, device=None) -> torch.Tensor:
    """Bool `[n, n]`: True where query i (row) attends key j (column) under `rule` with `sink` sink tokens."""
    window = rule.window(n)
    i = torch.arange(n, device=device).unsqueeze(1)
    j = torch.arange(n, device=device).unsqueeze(0)
    return (j <= i) & ((i - j < window) | (j < sink))
