"""End-to-end training throughput per recipe vs sequence length, at a fixed number of tokens per step.

    python bench/train.py --quick     # CPU reduced mode: tiny widths, T = 256 ... 2048
    python bench/train.py             # GPU: recipe widths, T = 2K ... 64K, plus the longest trainable T per recipe

One step = forward + backward + AdamW update of the recipe's model (its pattern and mixers; widths shrunk on CPU)
on random tokens, `tokens_per_step` tokens split into `tokens_per_step / T` sequences of length T; the data
pipeline is excluded. Reported: median step time after warm-up, tokens/s, peak memory (CUDA allocator; on CPU the
process's peak RSS growth during the measurement), and MFU on GPUs (FLOPs from `lctrain.models.flops`). A pure
linear model should keep constant tokens/s as T grows; attention layers cost O(T) per token and fall off. On a GPU
the longest trainable T with activation checkpointing is found by doubling then bisecting until out of memory.
Writes bench/results/train_<cpu|gpu>.json; plot with `python bench/plots.py`.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lctrain.config import load_config  # noqa: E402
from lctrain.models import LanguageModel  # noqa: E402
from lctrain.models.flops import flops_per_token, peak_flops  # noqa: E402

RECIPES = {"A (tiny)": "tiny", "G (gdn)": "gdn", "GGGA (hybrid_3to1)": "hybrid_3to1",
           "GGGGGGA (hybrid_6to1)": "hybrid_6to1"}
# CPU: shrink every recipe to the same small width, keep its pattern (depth = one pattern period, at least 4).
CPU_WIDTH = {"d_model": 128, "n_heads": 4, "n_kv_heads": 2, "ffn_dim": 256, "vocab_size": 2048,
             "mixers": {"gdn": {"n_heads": 2, "head_k_dim": 32, "head_v_dim": 64}}}


def model_config(recipe: str, device: str):
    cfg = load_config(ROOT / "recipes" / f"{recipe}.yaml").model
    cfg.vocab_size = cfg.vocab_size or 32000
    if device == "cpu":
        period = len(cfg.pattern) if isinstance(cfg.pattern, str) else len(cfg.pattern)
        cfg = dataclasses.replace(cfg, n_layers=max(period, 4) if max(period, 4) % period == 0 else period,
                                  activation_checkpointing=False, **CPU_WIDTH)
    return cfg


def measure(cfg, seq_len: int, tokens_per_step: int, device: str, steps: int, warmup: int) -> dict:
    torch.manual_seed(0)
    model = LanguageModel(cfg).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device == "cuda")
    batch = max(tokens_per_step // seq_len, 1)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq_len), device=device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else torch.autocast("cpu",
                                                                                                    enabled=False)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        with autocast:
            out = model(ids, labels=ids)
        (out.loss_sum / out.n_targets).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    tokens = batch * seq_len
    row = {"seq_len": seq_len, "batch": batch, "step_s": step_s, "tokens_per_s": tokens / step_s}
    if device == "cuda":
        row["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        peak = peak_flops(torch.cuda.get_device_name())
        row["mfu"] = row["tokens_per_s"] * flops_per_token(model, seq_len) / peak if peak else None
    else:
        row["peak_rss_growth_mib"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    del model, optimizer
    return row


def longest_trainable(cfg, device: str, start: int) -> int:
    """Longest T (one sequence per step, activation checkpointing on) that trains without running out of memory."""
    cfg = dataclasses.replace(cfg, activation_checkpointing=True)

    def fits(seq_len: int) -> bool:
        try:
            measure(cfg, seq_len, seq_len, device, steps=1, warmup=0)
            return True
        except torch.cuda.OutOfMemoryError:
            return False
        finally:
            torch.cuda.empty_cache()

    good, bad = 0, start
    while fits(bad):  # double until the first failure
        good, bad = bad, bad * 2
    while bad - good > max(good // 16, 1024):  # bisect to ~6 %
        mid = (good + bad) // 2 // 1024 * 1024
        good, bad = (mid, bad) if fits(mid) else (good, mid)
    return good


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CPU reduced mode (the default without a GPU)")
    parser.add_argument("--lengths", help="comma-separated sequence lengths")
    parser.add_argument("--tokens-per-step", type=int)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out-dir", default=str(ROOT / "bench" / "results"))
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() and not args.quick else "cpu"
    if args.lengths:
        lengths = [int(n) for n in args.lengths.split(",")]
    else:
        lengths = [2048, 4096, 8192, 16384, 32768, 65536] if device == "cuda" else [256, 512, 1024, 2048]
    tokens_per_step = args.tokens_per_step or (max(lengths) if device == "cpu" else 65536)
    rows = []
    for label, recipe in RECIPES.items():
        cfg = model_config(recipe, device)
        for seq_len in lengths:
            row = {"recipe": label, "pattern": cfg.pattern, **measure(cfg, seq_len, tokens_per_step, device,
                                                                     args.steps, warmup=1)}
            rows.append(row)
            print(f"{label:24s} T={seq_len:6d} step {row['step_s'] * 1e3:9.1f} ms  {row['tokens_per_s']:10.0f} tok/s",
                  flush=True)
        if device == "cuda":
            longest = longest_trainable(cfg, device, start=max(lengths))
            rows.append({"recipe": label, "pattern": cfg.pattern, "longest_seq_len_ac": longest})
            print(f"{label:24s} longest trainable T with activation checkpointing: {longest}", flush=True)
    name = torch.cuda.get_device_name() if device == "cuda" else (platform.processor() or platform.machine())
    payload = {"machine": f"{name} ({os.cpu_count()} cpus, torch {torch.__version__})", "device": device,
               "date": time.strftime("%Y-%m-%d"), "tokens_per_step": tokens_per_step,
               "threads": torch.get_num_threads(), "command": " ".join(["python", "bench/train.py", *sys.argv[1:]]),
               "rows": rows}
    path = Path(args.out_dir) / f"train_{device}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
