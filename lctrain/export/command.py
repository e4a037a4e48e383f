"""`python -m lctrain export RUN_DIR_OR_CHECKPOINT OUT_DIR [--dtype float32|bfloat16]`."""
from __future__ import annotations

import argparse


def export_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lctrain export",
        description="Write a run's newest checkpoint (or a given checkpoint) as a Hugging Face model directory.")
    parser.add_argument("source", help="run directory, its checkpoints/ directory, or checkpoints/step-N")
    parser.add_argument("out_dir", help="directory to write (created; existing files are replaced)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="weight dtype")
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors file before sharding")
    parser.add_argument("--remote-code", action="store_true",
                        help="write lctrain's modeling code even for a pure-attention model (default: Llama)")
    args = parser.parse_args(argv)
    from lctrain.export.hf_export import export_run

    out = export_run(args.source, args.out_dir, args.dtype, args.max_shard_size, args.remote_code)
    print(f"exported {args.source} -> {out}")
    return 0
