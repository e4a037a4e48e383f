"""Benchmark: landmark attention vs dense causal attention, and Titans linear memory throughput vs length.

    python bench/kernels_landmark_titans.py [--mode cpu|gpu] [--out bench/results]

CPU mode (reduced shapes, PyTorch paths) times forward + backward with a median over repeats; GPU mode (larger
shapes, CUDA tensors, `triton.testing.do_bench`) uses whatever backend the ops pick on CUDA. Writes
`kernels_landmark_titans_<mode>.json` and `.png` to the output folder.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from lctrain.kernels import landmark_attention, titans_linear_memory  # noqa: E402


def _median_seconds(fn, repeats: int, device: str) -> float:
    fn()  # warm-up
    if device == "cuda":
        from triton.testing import do_bench
        return do_bench(fn, return_mode="median") / 1e3
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _fwd_bwd(op, *inputs):
    def run():
        out = op(*inputs)
        out = out[0] if isinstance(out, tuple) else out
        out.sum().backward()
    return run


def bench(mode: str) -> dict:
    device = "cuda" if mode == "gpu" else "cpu"
    dtype = torch.bfloat16 if mode == "gpu" else torch.float32
    heads, dim = (16, 64) if mode == "gpu" else (4, 32)
    lengths = [2048, 4096, 8192, 16384] if mode == "gpu" else [256, 512, 1024, 2048]
    repeats = 3
    rows = []
    for length in lengths:
        def leaf(*shape):
            return torch.randn(*shape, device=device, dtype=dtype, requires_grad=True)

        q, k, v = (leaf(1, length, heads, dim) for _ in range(3))
        dense = _median_seconds(_fwd_bwd(lambda a, b, c: F.scaled_dot_product_attention(
            a.transpose(1, 2), b.transpose(1, 2), c.transpose(1, 2), is_causal=True), q, k, v), repeats, device)
        landmark = _median_seconds(_fwd_bwd(lambda a, b, c: landmark_attention(a, b, c, 64), q, k, v),
                                   repeats, device)
        kn = F.normalize(torch.randn(1, length, heads, dim, device=device), dim=-1).to(dtype).requires_grad_()
        gates = [torch.rand(1, length, heads, device=device).mul_(0.5).requires_grad_() for _ in range(3)]
        titans = _median_seconds(_fwd_bwd(lambda a, b, c, *g: titans_linear_memory(a, b, c, *g, chunk_size=64),
                                          q, kn, v, *gates), repeats, device)
        rows.append({"T": length, "dense_sdpa_s": dense, "landmark_s": landmark, "titans_s": titans,
                     "titans_tokens_per_s": length / titans, "landmark_over_dense": landmark / dense})
        print(json.dumps(rows[-1]))
    name = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine()
    return {"mode": mode, "device": name, "torch_threads": torch.get_num_threads(), "heads": heads, "head_dim": dim,
            "dtype": str(dtype), "block_size": 64, "titans_chunk": 64, "measure": "forward+backward, median",
            "rows": rows}


def plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = [r["T"] for r in report["rows"]]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(lengths, [r["dense_sdpa_s"] * 1e3 for r in report["rows"]], "o-", label="dense causal (SDPA)")
    left.plot(lengths, [r["landmark_s"] * 1e3 for r in report["rows"]], "o-", label="landmark (block 64)")
    left.set(xscale="log", yscale="log", xlabel="T", ylabel="fwd+bwd ms", title="attention")
    left.legend()
    right.plot(lengths, [r["titans_tokens_per_s"] for r in report["rows"]], "o-")
    right.set(xscale="log", xlabel="T", ylabel="tokens/s (fwd+bwd)", title="Titans linear memory")
    fig.suptitle(f"{report['mode']} · {report['device']}")
    fig.tight_layout()
    fig.savefig(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mode", choices=("cpu", "gpu"), default="gpu" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args()
    report = bench(args.mode)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"kernels_landmark_titans_{args.mode}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1))
    plot(report, stem.with_suffix(".png"))
    print(f"wrote {stem}.json and .png")


if __name__ == "__main__":
    main()
