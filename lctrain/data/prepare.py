"""`python -m lctrain prepare RECIPE [key=value ...] [--shard i/n]`: fill the token cache ahead of training.

Trains (or finds) the tokenizer, then tokenises every missing shard of `data.sources` and `data.eval_sources` with
`data.num_workers` processes. With `--shard i/n` it builds only the i-th of n equal shares (as a SLURM array job:
`--shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT`); the tasks may run at once on any nodes. Training started
afterwards finds every shard cached. Exit code 2 on a bad recipe or a bad record (named by file and line).
"""
from __future__ import annotations

import argparse
import time

from lctrain.config import SYNTHETIC_SOURCES, ConfigError, load_config, resolve_cache_dir


def parse_share(text: str) -> tuple[int, int]:
    """`i/n` -> (i, n) with 0 <= i < n."""
    try:
        i, n = (int(part) for part in text.split("/"))
    except ValueError:
        i, n = -1, 0
    if not 0 <= i < n:
        raise ConfigError(f"prepare --shard: {text!r} is not allowed; expected i/n with 0 <= i < n, e.g. 0/4")
    return i, n


def prepare_main(argv: list[str]) -> int:
    from lctrain.cli_args import find_recipe
    from lctrain.data.build import prepare_shards
    from lctrain.data.parallel_build import default_workers
    from lctrain.data.sources import build_sources
    from lctrain.data.tokenizer import get_tokenizer

    parser = argparse.ArgumentParser(prog="python -m lctrain prepare", description=__doc__.splitlines()[0])
    parser.add_argument("recipe", help="recipe YAML or a shipped recipe name")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.num_workers=8")
    parser.add_argument("--shard", default="", help="i/n: build only the i-th of n shares of the missing shards")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_intermixed_args(argv)  # flags may sit between the overrides
    share = parse_share(args.shard) if args.shard else (0, 1)
    cfg = load_config(find_recipe(args.recipe), args.overrides)
    data = cfg.data
    cache_dir = resolve_cache_dir(cfg)
    t0 = time.perf_counter()
    sources = build_sources(data.sources, data.max_documents, cache_dir)
    eval_sources = build_sources(data.eval_sources, data.max_documents, cache_dir, "data.eval_sources")
    tokenizer = get_tokenizer(data, sources, cache_dir)
    files = [s for s in sources + eval_sources if s.config.type not in SYNTHETIC_SOURCES]
    workers = data.num_workers or default_workers()
    _, plan = prepare_shards(files, tokenizer, cache_dir, data.on_bad_record, workers, share[0], share[1],
                             not args.no_progress, tokenize=True, only_mine=bool(args.shard))
    build = plan.get("build", {})
    seconds = time.perf_counter() - t0
    rate = build.get("bytes", 0) / 2**20 / max(build.get("seconds", 0.0), 1e-9)
    who = f"share {share[0]}/{share[1]}" if args.shard else "all shares"
    print(f"prepared {cache_dir} ({who}): {plan['shards']} shards, {plan['cached']} were cached, built "
          f"{build.get('built', 0)} ({build.get('bytes', 0) / 2**20:.1f} MiB, {build.get('tokens', 0):,} tokens, "
          f"{rate:.1f} MiB/s with {workers} workers) in {seconds:.1f} s", flush=True)
    return 0
