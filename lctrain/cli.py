"""Command line: `python -m lctrain RECIPE [key=value ...] [--dry-run]` trains.

Errors in the recipe or the overrides print one line on stderr and exit with code 2; a run that has to stop
(e.g. non-finite steps) exits with code 1; a preempted run saves and exits 0.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from lctrain.cli_args import find_recipe
from lctrain.config import ConfigError, load_config

SUBCOMMANDS = {}  # name -> callable(argv) -> int; filled by subpackages that add commands


def _export(argv: list[str]) -> int:
    from lctrain.export.command import export_main  # imported on use: keeps `python -m lctrain` start-up light
    return export_main(argv)


SUBCOMMANDS["export"] = _export


def _eval(argv: list[str]) -> int:
    from lctrain.eval.command import eval_main  # imported on use, like export
    return eval_main(argv)


SUBCOMMANDS["eval"] = _eval


def _moa(argv: list[str]) -> int:
    from lctrain.moa.command import moa_main  # profile / search of per-head attention spans
    return moa_main(argv)


SUBCOMMANDS["moa"] = _moa


def _plan(argv: list[str]) -> int:
    from lctrain.plan.command import plan_main  # memory / communication / time of a recipe on N GPUs
    return plan_main(argv)


SUBCOMMANDS["plan"] = _plan

def _prepare(argv: list[str]) -> int:
    from lctrain.data.prepare import prepare_main  # tokenise the data ahead of training
    return prepare_main(argv)


SUBCOMMANDS["prepare"] = _prepare


def _strip_launcher_args(argv: list[str]) -> list[str]:
    """The DeepSpeed launcher appends --local_rank=N (or --local_rank N); the rank comes from the environment."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg.startswith("--local_rank=") or arg.startswith("--local-rank="):
            continue
        if arg in ("--local_rank", "--local-rank"):
            skip = True
            continue
        out.append(arg)
    return out


def train_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m lctrain", description="Train a model from a recipe.")
    parser.add_argument("recipe", nargs="?", default="tiny", help="recipe YAML (default: the embedded tiny recipe)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=20 model.n_layers=4")
    parser.add_argument("--dry-run", action="store_true",
                        help="build the model and the tokenizer, count the data (no tokenising), exit")
    args = parser.parse_intermixed_args(argv)  # flags may sit between the overrides
    if "=" in args.recipe:  # `python -m lctrain train.steps=5` means the default recipe with an override
        args.overrides.insert(0, args.recipe)
        args.recipe = "tiny"
    cfg = load_config(find_recipe(args.recipe), args.overrides)
    from lctrain.train.dist import discover_ranks
    if discover_ranks()[0] == 0:
        print(f"# resolved config ({args.recipe})\n{cfg.to_yaml()}", flush=True)
    from lctrain.train.loop import train
    return train(cfg, dry_run=args.dry_run)


def main(argv: list[str] | None = None) -> int:
    argv = _strip_launcher_args(list(sys.argv[1:] if argv is None else argv))
    try:
        if argv and argv[0] in SUBCOMMANDS:
            return SUBCOMMANDS[argv[0]](argv[1:])
        return train_main(argv)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # one line for known failure kinds; a traceback only when asked for
        from lctrain.train.loop import TrainingAborted
        if isinstance(exc, TrainingAborted):
            print(f"error: training aborted: {exc}", file=sys.stderr)
            return 1
        if os.environ.get("LCTRAIN_TRACEBACK"):
            raise
        print(f"error: {type(exc).__name__}: {exc} (set LCTRAIN_TRACEBACK=1 for the traceback)", file=sys.stderr)
        return 1
