"""Benchmark of `local_attention` and `taylor_linear_attention`.

CPU (reduced mode): forward+backward tokens/s vs T at a fixed window for
  * local_attention's blocked torch path (O(T * (window + sink)) scores) against SDPA with the equivalent dense
    [T, T] band mask (O(T^2)), with the score-buffer bytes each materialises per head (memory vs T);
  * taylor_linear_attention's chunked torch path against the token-by-token reference.
GPU (full mode, when CUDA is present): the Triton kernels in bf16, plus flash-attn's sliding window
(`flash_attn_func(window_size=...)`) and fla's `parallel_based` / `fused_chunk_based` when importable.

    python bench/kernels_local_taylor.py            # GPU when present, else CPU reduced mode
    python bench/kernels_local_taylor.py --cpu --quick
Writes bench/results/kernels_local_taylor_<device>.json and .png.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.kernel_speed import time_fn  # noqa: E402  (do_bench median on GPU, best of 3 on CPU)
from lctrain.kernels import local_attention, taylor_linear_attention  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def band_mask(length, window, device):
    i = torch.arange(length, device=device)
    return (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < window)


def fwd_bwd(op, *tensors):
    def run():
        leaves = [t.detach().requires_grad_() for t in tensors]
        op(*leaves).float().sum().backward()
    return run


def bench_local(device, dtype, lengths, heads, dim, window, backend):
    rows = []
    for length in lengths:
        q, k, v = (torch.randn(1, length, heads, dim, device=device, dtype=dtype) for _ in range(3))
        local_ms = time_fn(fwd_bwd(lambda a, b, c: local_attention(a, b, c, window, backend=backend), q, k, v), device)
        mask = band_mask(length, window, device)
        sdpa = lambda a, b, c: F.scaled_dot_product_attention(  # noqa: E731
            a.transpose(1, 2), b.transpose(1, 2), c.transpose(1, 2), attn_mask=mask)
        sdpa_ms = time_fn(fwd_bwd(sdpa, q, k, v), device)
        block = 64
        row = {"T": length, "window": window, "local_ms": local_ms, "sdpa_dense_mask_ms": sdpa_ms,
               "local_tokens_per_s": length / local_ms * 1e3, "sdpa_tokens_per_s": length / sdpa_ms * 1e3,
               # per head, fp32: the blocked path's [T, block + window - 1] scores vs the dense [T, T] ones
               "local_score_bytes_per_head": length * (min(block, length) + window - 1) * 4,
               "sdpa_score_bytes_per_head": length * length * 4}
        try:
            from flash_attn import flash_attn_func
            if device == "cuda":
                row["flash_window_ms"] = time_fn(fwd_bwd(
                    lambda a, b, c: flash_attn_func(a, b, c, causal=True, window_size=(window - 1, 0)), q, k, v), device)
        except ImportError:
            pass
        rows.append(row)
        print(json.dumps(row))
    return rows


def bench_taylor(device, dtype, lengths, heads, feature_dim, value_dim, backend):
    rows = []
    for length in lengths:
        q, k = (torch.randn(1, length, heads, feature_dim, device=device, dtype=dtype) for _ in range(2))
        v = torch.randn(1, length, heads, value_dim, device=device, dtype=dtype)
        row = {"T": length}
        row["chunk_ms"] = time_fn(fwd_bwd(lambda a, b, c: taylor_linear_attention(a, b, c, backend=backend)[0],
                                          q, k, v), device)
        row["chunk_tokens_per_s"] = length / row["chunk_ms"] * 1e3
        if device == "cpu" and length <= 1024:
            row["naive_ms"] = time_fn(fwd_bwd(lambda a, b, c: taylor_linear_attention(a, b, c, backend="naive")[0],
                                              q, k, v), device, reps=1)
            row["naive_tokens_per_s"] = length / row["naive_ms"] * 1e3
        try:
            from fla.ops.based import fused_chunk_based, parallel_based
            if device == "cuda":
                row["fla_parallel_based_ms"] = time_fn(fwd_bwd(lambda a, b, c: parallel_based(a, b, c), q, k, v), device)
                row["fla_fused_chunk_based_ms"] = time_fn(
                    fwd_bwd(lambda a, b, c: fused_chunk_based(a, b, c), q, k, v), device)
        except ImportError:
            pass
        rows.append(row)
        print(json.dumps(row))
    return rows


def plot(result, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    local = result["local_attention"]
    lengths = [r["T"] for r in local]
    axes[0].plot(lengths, [r["local_tokens_per_s"] for r in local], "o-", label="local_attention (blocked)")
    axes[0].plot(lengths, [r["sdpa_tokens_per_s"] for r in local], "s-", label="SDPA + dense band mask")
    axes[0].set(xscale="log", yscale="log", xlabel="T", ylabel="tokens/s (fwd+bwd)",
                title=f"local attention, window {local[0]['window']}")
    axes[1].plot(lengths, [r["local_score_bytes_per_head"] / 2 ** 20 for r in local], "o-", label="blocked")
    axes[1].plot(lengths, [r["sdpa_score_bytes_per_head"] / 2 ** 20 for r in local], "s-", label="dense")
    axes[1].set(xscale="log", yscale="log", xlabel="T", ylabel="score MiB per head", title="O(T*W) vs O(T^2)")
    taylor = result["taylor_linear_attention"]
    axes[2].plot([r["T"] for r in taylor], [r["chunk_tokens_per_s"] for r in taylor], "o-", label="chunked")
    naive = [r for r in taylor if "naive_tokens_per_s" in r]
    axes[2].plot([r["T"] for r in naive], [r["naive_tokens_per_s"] for r in naive], "s-", label="token loop")
    axes[2].set(xscale="log", yscale="log", xlabel="T", ylabel="tokens/s (fwd+bwd)", title="Taylor linear attention")
    for ax in axes:
        ax.legend()
    fig.suptitle(result["device"])
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cpu", action="store_true", help="CPU reduced mode even when CUDA is present")
    parser.add_argument("--quick", action="store_true", help="fewer, shorter sequences")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    if device == "cuda":
        dtype, backend = torch.bfloat16, "triton"
        local_lengths = [2048, 4096, 8192, 16384, 32768]
        taylor_lengths = [2048, 8192, 32768]
        heads, name = 16, torch.cuda.get_device_name()
    else:
        torch.set_num_threads(2)
        dtype, backend = torch.float32, "torch"
        local_lengths = [256, 512, 1024, 2048] if args.quick else [256, 512, 1024, 2048, 4096]
        taylor_lengths = [256, 1024] if args.quick else [256, 1024, 4096]
        heads, name = 2, f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    result = {"device": name, "dtype": str(dtype), "heads": heads,
              "local_attention": bench_local(device, dtype, local_lengths, heads, 64, 64, backend),
              "taylor_linear_attention": bench_taylor(device, dtype, taylor_lengths, heads, 16, 64, backend)}
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / f"kernels_local_taylor_{device}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1))
    plot(result, stem.with_suffix(".png"))
    print(f"wrote {stem}.json and .png")


if __name__ == "__main__":
    main()
