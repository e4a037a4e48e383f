"""Argument types and the parser class shared by the subcommands (`eval`, `moa`): every bad argument becomes a
one-line `ConfigError` (exit code 2) instead of argparse's usage text."""
from __future__ import annotations

import argparse
from pathlib import Path

from lctrain.config import ConfigError


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str):
        raise ConfigError(f"{self.prog}: {message}")


def _number(text: str, kind):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None


def positive_int(text: str) -> int:
    value = _number(text, int)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not allowed; expected a positive integer")
    return value


def positive_number(text: str) -> float:
    value = _number(text, float)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{value:g} is not allowed; expected a number > 0")
    return value


def fraction(text: str) -> float:
    """A number in (0, 1]."""
    value = _number(text, float)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{value:g} is not allowed; expected a number in (0, 1]")
    return value


def _list(text: str, kind) -> list:
    """Comma-separated values of `kind` (int or float)."""
    try:
        return [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        noun = "integers" if kind is int else "numbers"
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of {noun}") from None


def int_list(text: str) -> list[int]:
    """Comma-separated positive integers, e.g. 512,2048."""
    values = _list(text, int)
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: expected positive integers, e.g. 512,2048")
    return values


def float_list(text: str) -> list[float]:
    """Comma-separated numbers, e.g. 0,0.5,1."""
    values = _list(text, float)
    if not values:
        raise argparse.ArgumentTypeError(f"{text!r}: expected numbers, e.g. 0,0.5,1")
    return values


RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"


def find_recipe(name: str) -> Path:
    """A path, or the name of a recipe shipped in recipes/ (`tiny`, `tiny.yaml`)."""
    path = Path(name)
    if path.is_file():
        return path
    for candidate in (RECIPES_DIR / name, RECIPES_DIR / f"{name}.yaml"):
        if candidate.is_file():
            return candidate
    known = ", ".join(sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))) if RECIPES_DIR.is_dir() else "none"
    raise ConfigError(f"recipe: file not found: {name} (shipped recipes: {known})")
