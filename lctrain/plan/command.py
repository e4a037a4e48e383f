"""`python -m lctrain plan RECIPE [key=value ...] --gpus N [--gpu h100] [--gpus-per-node 8] [--json FILE]`."""
from __future__ import annotations

import argparse

from lctrain.config import ConfigError, load_config


def plan_main(argv: list[str]) -> int:
    from lctrain.plan.gpus import GPUS, load_measured_efficiency
    parser = argparse.ArgumentParser(prog="python -m lctrain plan",
                                     description="Memory, communication and time of a recipe on N GPUs, for every "
                                                 "sensible configuration.")
    parser.add_argument("recipe", help="recipe YAML or the name of a shipped recipe")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.seq_len=131072")
    parser.add_argument("--gpus", type=int, required=True, help="number of GPUs")
    parser.add_argument("--gpu", default="h100", help=f"GPU kind: {', '.join(GPUS)} (default h100)")
    parser.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (NVLink domain), default 8")
    parser.add_argument("--json", help="write the whole plan as JSON here")
    parser.add_argument("--top", type=int, default=15, help="rows of the table (default 15)")
    args = parser.parse_intermixed_args(argv)  # flags may sit between the overrides
    if args.gpu not in GPUS:
        raise ConfigError(f"plan: --gpu must be one of {', '.join(GPUS)}, got {args.gpu!r}")
    if args.gpus < 1:
        raise ConfigError(f"plan: --gpus must be a positive integer, got {args.gpus}")
    if args.gpus_per_node < 1:
        raise ConfigError(f"plan: --gpus-per-node must be a positive integer, got {args.gpus_per_node}")
    from lctrain.cli_args import find_recipe
    from lctrain.plan.report import format_plan, write_json
    from lctrain.plan.search import plan
    cfg = load_config(find_recipe(args.recipe), args.overrides)
    gpu = load_measured_efficiency(GPUS[args.gpu], args.gpu)
    result = plan(cfg, args.gpus, gpu, args.gpus_per_node)
    print(format_plan(result, args.top))
    if args.json:
        write_json(result, args.json)
        print(f"wrote {args.json}")
    return 0
