"""Kernel benchmark: forward and forward+backward time of lctrain's ops against fla and SDPA attention.

GPU (full mode): bf16, T = 2K ... 64K at a fixed number of tokens per batch, lctrain Triton vs fla
(`fla-core`: chunk_simple_gla, chunk_gated_delta_rule) vs torch SDPA causal attention, median of
`triton.testing.do_bench`; reports ms, effective TFLOP/s and the ratio to fla.
CPU (reduced mode): the chunked PyTorch path's tokens/s vs T at fixed total tokens, which shows linear cost
(constant tokens/s) against SDPA's quadratic cost.

    python bench/kernel_speed.py                 # GPU when present, else CPU reduced mode
    python bench/kernel_speed.py --cpu --quick   # a few seconds
Writes bench/results/kernels_<device>.json and .png.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lctrain.kernels import gated_delta_rule, linear_attention  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def flops_linear(batch, seqlen, heads, dk, dv, chunk=64) -> float:
    """Chunked linear attention: intra-chunk QK^T and (QK^T)V (causal half) + inter-chunk state read/update."""
    intra = 2 * batch * heads * seqlen * chunk * (dk + dv) / 2
    inter = 2 * batch * heads * seqlen * dk * dv * 2
    return intra + inter


def flops_delta(batch, seqlen, heads, dk, dv, chunk=64) -> float:
    """Delta rule adds the WY build (K K^T, triangular solve) and the U/W products per chunk."""
    return flops_linear(batch, seqlen, heads, dk, dv, chunk) + 2 * batch * heads * seqlen * (chunk * dk + 2 * dk * dv)


def flops_attention(batch, seqlen, heads, d) -> float:
    return 4 * batch * heads * seqlen * seqlen * d / 2  # causal


def make_inputs(batch, seqlen, heads, dk, dv, device, dtype, grad=True):
    q = torch.randn(batch, seqlen, heads, dk, device=device, dtype=dtype)
    k = F.normalize(torch.randn(batch, seqlen, heads, dk, device=device, dtype=torch.float32), dim=-1).to(dtype)
    v = torch.randn(batch, seqlen, heads, dv, device=device, dtype=dtype)
    g = -torch.rand(batch, seqlen, heads, device=device, dtype=torch.float32) * 0.1
    beta = torch.rand(batch, seqlen, heads, device=device, dtype=torch.float32).sigmoid()
    tensors = [q, k, v, g, beta]
    for t in tensors:
        t.requires_grad_(grad)
    return tensors


def time_fn(fn, device, reps=3) -> float:
    """Milliseconds: triton's do_bench (median) on GPU, best of `reps` wall-clock runs on CPU."""
    if device == "cuda":
        from triton.testing import do_bench
        return do_bench(fn, warmup=25, rep=100, return_mode="median")
    fn()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def cases(device, args):
    heads, dk, dv = (16, 128, 128) if device == "cuda" else (4, 64, 64)
    total = args.total_tokens or (65536 if device == "cuda" else (4096 if args.quick else 16384))
    lengths = [2048, 4096, 8192, 16384, 32768, 65536] if device == "cuda" else \
        ([512, 1024, 2048, 4096] if args.quick else [512, 1024, 2048, 4096, 8192, 16384])
    for seqlen in lengths:
        if seqlen > total:
            continue
        yield total // seqlen, seqlen, heads, dk, dv


def run(args) -> list[dict]:
    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    backend = "triton" if device == "cuda" else "torch"
    fla = None
    if device == "cuda":
        try:
            import fla.ops.gated_delta_rule as fla_gdr
            import fla.ops.simple_gla as fla_sgla
            fla = (fla_sgla.chunk_simple_gla, fla_gdr.chunk_gated_delta_rule)
        except ImportError:
            print("fla-core not installed: no fla comparison", file=sys.stderr)
    rows = []
    for batch, seqlen, heads, dk, dv in cases(device, args):
        q, k, v, g, beta = make_inputs(batch, seqlen, heads, dk, dv, device, dtype)
        ops = {
            "linear_attention": (lambda: linear_attention(q, k, v, log_decay=g, backend=backend)[0],
                                 flops_linear(batch, seqlen, heads, dk, dv)),
            "gated_delta_rule": (lambda: gated_delta_rule(q, k, v, g, beta, backend=backend)[0],
                                 flops_delta(batch, seqlen, heads, dk, dv)),
            "sdpa_causal": (lambda: F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True),
                flops_attention(batch, seqlen, heads, dk)),
        }
        if fla is not None:
            ops["fla_simple_gla"] = (lambda: fla[0](q, k, v, g=g)[0], flops_linear(batch, seqlen, heads, dk, dv))
            ops["fla_gated_delta_rule"] = (lambda: fla[1](q, k, v, g=g, beta=beta)[0],
                                           flops_delta(batch, seqlen, heads, dk, dv))
        for name, (fwd, flops) in ops.items():
            if device == "cpu" and name == "sdpa_causal" and seqlen > 8192:
                continue
            def fwd_bwd(fwd=fwd):
                out = fwd()
                out.float().sum().backward()
            ms_f = time_fn(lambda: fwd(), device)
            ms_fb = time_fn(fwd_bwd, device)
            rows.append({"op": name, "B": batch, "T": seqlen, "H": heads, "K": dk, "V": dv, "dtype": str(dtype),
                         "fwd_ms": ms_f, "fwdbwd_ms": ms_fb, "fwd_tflops": flops / ms_f / 1e9,
                         "fwdbwd_tflops": 3 * flops / ms_fb / 1e9,
                         "tokens_per_s_fwdbwd": batch * seqlen / (ms_fb / 1e3)})
            print(f"{name:22s} T={seqlen:6d} B={batch:3d}  fwd {ms_f:9.2f} ms  fwd+bwd {ms_fb:9.2f} ms  "
                  f"{rows[-1]['tokens_per_s_fwdbwd']:12,.0f} tok/s", flush=True)
    for row in rows:  # ratio to fla on the same shape (GPU)
        ref = {"linear_attention": "fla_simple_gla", "gated_delta_rule": "fla_gated_delta_rule"}.get(row["op"])
        match = [r for r in rows if r["op"] == ref and r["T"] == row["T"]]
        if match:
            row["speedup_vs_fla_fwdbwd"] = match[0]["fwdbwd_ms"] / row["fwdbwd_ms"]
    return rows


def write(rows, device_name):
    RESULTS.mkdir(parents=True, exist_ok=True)
    tag = "cpu" if device_name == "cpu" else device_name.replace(" ", "_")
    meta = {"device": device_name, "torch": torch.__version__, "machine": platform.machine(),
            "date": time.strftime("%Y-%m-%d")}
    (RESULTS / f"kernels_{tag}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    for op in dict.fromkeys(r["op"] for r in rows):
        pts = [(r["T"], r["tokens_per_s_fwdbwd"]) for r in rows if r["op"] == op]
        ax.plot(*zip(*pts), marker="o", label=op)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length T (fixed tokens per batch)")
    ax.set_ylabel("fwd+bwd tokens/s")
    ax.set_title(f"lctrain kernels on {device_name}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / f"kernels_{tag}.png", dpi=120)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true", help="force the CPU reduced mode")
    parser.add_argument("--quick", action="store_true", help="fewer, shorter lengths")
    parser.add_argument("--total-tokens", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = run(args)
    device_name = torch.cuda.get_device_name() if torch.cuda.is_available() and not args.cpu else "cpu"
    write(rows, device_name)


if __name__ == "__main__":
    main()
