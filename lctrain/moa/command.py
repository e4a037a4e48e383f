"""`python -m lctrain moa profile ...` (measure every rule on every head; see `lctrain.moa.profile`) and
`python -m lctrain moa search PROFILE --density D --out PLAN.json` (solve the MILP, write the plan, print it).
Bad input raises `ConfigError`: one line on stderr and exit code 2."""
from __future__ import annotations

import argparse
from pathlib import Path

from lctrain.cli_args import OneLineParser, fraction, positive_int, positive_number
from lctrain.config import ConfigError


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="moa", description="MoA: elastic per-head sparse attention spans.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    sub.add_parser("profile", help="profile every rule on every attention head (options: moa profile --help)",
                   add_help=False)
    s = sub.add_parser("search", help="choose one rule per head under a density budget (MILP)")
    s.add_argument("profile", help="profile file written by `moa profile`")
    s.add_argument("--density", type=fraction, required=True,
                   help="mean attention density budget in (0, 1] met at every profiled length")
    s.add_argument("--out", required=True, help="plan JSON to write")
    s.add_argument("--max-rules-per-layer", type=positive_int, default=2, help="distinct rules per layer (default 2)")
    s.add_argument("--time-limit", type=positive_number, default=600.0, help="solver time limit in seconds (default 600)")
    return p


def load_profile(path) -> dict:
    """torch.load a profile (weights_only) and validate it; `ConfigError` naming the path on any problem."""
    import torch

    from lctrain.moa.search import check_profile

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"moa search: profile {path}: file not found")
    try:
        profile = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle / zip / unsupported-global errors: all mean "not a profile file"
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConfigError(f"moa search: profile {path}: cannot be read as a torch file ({first})") from None
    try:
        check_profile(profile)
    except ValueError as exc:
        raise ConfigError(f"moa search: profile {path}: {exc}") from None
    return profile


def search_main(args) -> int:
    from lctrain.moa.plan import save_plan
    from lctrain.moa.search import search, summarize

    profile = load_profile(args.profile)
    try:
        plan = search(profile, args.density, args.max_rules_per_layer, time_limit=args.time_limit)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    out = save_plan(plan, args.out)
    print(summarize(plan))
    print(f"wrote {out}")
    return 0


def moa_main(argv: list[str]) -> int:
    argv = list(argv)
    if argv and argv[0] == "profile":
        from lctrain.moa.profile import profile_main  # written separately; imported on use
        return profile_main(argv[1:])
    args = build_parser().parse_args(argv)
    if args.command == "search":
        return search_main(args)
    raise ConfigError(f"moa: unknown command {args.command!r}")  # pragma: no cover (argparse rejects it first)
