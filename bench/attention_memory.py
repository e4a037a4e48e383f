"""Memory of softmax attention vs sequence length on the CPU: the fused op is linear in T.

1. One `attn` block (the mixer: projections, RoPE, attention; d_model 512, 8 heads of 64) forward + backward on
   8 packed documents of T / 8 tokens: peak RSS growth of a fresh process, for the fused op (blockwise torch
   path) and for the previous path (SDPA with a dense `[B, 1, T, T]` document mask, `--dense`).
2. Ring sequence parallelism (sp = 4 gloo processes, zigzag, one document, 4 heads of 64) forward + backward
   of `sp_attention`: the largest rank's peak RSS (and its growth during the step), for each T.

    python bench/attention_memory.py                       # block at 4K/8K/16K (+ dense), ring at 16K/32K
    python bench/attention_memory.py --quick               # small sizes, seconds
    python bench/attention_memory.py --block-lengths "" --out bench/results/attention_memory_ring_cpu   # ring only
Prints a table, writes bench/results/attention_memory_cpu.json and .png.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = Path(__file__).resolve().parent / "results"
MIB = 2 ** 20


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024      # KiB on Linux


def _packed_positions(length: int, docs: int) -> torch.Tensor:
    size = length // docs
    pos = torch.arange(length) % size
    return pos[None]


def block_measurement(length: int, dense: bool) -> dict:
    """Run in a fresh process: build the block and inputs, then fwd + bwd once and report the growth."""
    from lctrain.config import ModelConfig
    from lctrain.models.context import BatchContext
    from lctrain.models.mixers.attention import Attention
    import importlib
    op = importlib.import_module("lctrain.kernels.attention")  # the module (lctrain.kernels.attention is the function)
    op.SDPA_MAX_DOCS = 0  # measure the op's own blockwise path, not torch's SDPA shortcut for a few documents
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=512, n_heads=8, attn_backend="torch")
    block = Attention(cfg, 0)

    def step(length):
        positions = _packed_positions(length, 8)
        x = torch.randn(1, length, 512, requires_grad=True)
        out = _dense_forward(block, x, positions) if dense else block(x, BatchContext.from_positions(positions))
        out.float().square().mean().backward()
    step(256)  # warm-up: lazy imports and first-call set-up are not the method's memory
    before = rss_bytes()
    start = time.perf_counter()
    step(length)
    seconds = time.perf_counter() - start
    return {"T": length, "method": "dense-mask SDPA" if dense else "fused op (torch path)",
            "growth_mib": (peak_bytes() - before) / MIB, "peak_rss_mib": peak_bytes() / MIB, "seconds": seconds}


def _dense_forward(block, x, positions):
    """The previous path of the `attn` mixer: SDPA with an explicit `[B, 1, T, T]` document-causal mask."""
    import torch.nn.functional as F
    from lctrain.models.context import BatchContext, document_ids
    from lctrain.models.mixers.qkv import rotated_qkv
    q, k, v = rotated_qkv(block, x, BatchContext(positions))
    docs = document_ids(positions)
    index = torch.arange(x.shape[1])
    mask = ((docs[:, :, None] == docs[:, None, :]) & (index[None, :] <= index[:, None])[None])[:, None]
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                       scale=block.scale)
    return block.o_proj(o.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1))


def _ring_worker(rank: int, world: int, port: int, length: int, out: str) -> None:
    import torch.distributed as dist
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    from lctrain.parallel import init_sp_groups, shard_batch, sp_attention
    groups = init_sp_groups(world)
    torch.manual_seed(0)
    heads, dim = 4, 64

    def inputs(length):
        batch = {"position_ids": torch.arange(length)[None],
                 "q": torch.randn(1, length, heads, dim), "k": torch.randn(1, length, heads, dim),
                 "v": torch.randn(1, length, heads, dim)}
        local, placement = shard_batch(batch, rank, world, "zigzag", groups=groups, attention_mode="ring")
        return [local[n].clone().requires_grad_() for n in ("q", "k", "v")], placement

    def step(qkv, placement):
        sp_attention(*qkv, placement).square().mean().backward()
    step(*inputs(256 * world))  # warm-up
    qkv, placement = inputs(length)
    dist.barrier()
    before = rss_bytes()
    start = time.perf_counter()
    step(qkv, placement)
    dist.barrier()
    seconds = time.perf_counter() - start
    with open(f"{out}.{rank}", "w") as f:
        json.dump({"growth_mib": (peak_bytes() - before) / MIB, "peak_rss_mib": peak_bytes() / MIB,
                   "seconds": seconds}, f)
    dist.destroy_process_group()


def ring_measurement(length: int, world: int = 4) -> dict:
    import tempfile
    import torch.multiprocessing as mp
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "ring")
        mp.spawn(_ring_worker, args=(world, 29000 + length % 997, length, out), nprocs=world, join=True)
        ranks = [json.load(open(f"{out}.{r}")) for r in range(world)]
    return {"T": length, "method": f"ring sp={world} (zigzag)", "growth_mib": max(r["growth_mib"] for r in ranks),
            "peak_rss_mib": max(r["peak_rss_mib"] for r in ranks),
            "per_rank_growth_mib": [r["growth_mib"] for r in ranks], "seconds": max(r["seconds"] for r in ranks)}


def _in_subprocess(kind: str, length: int, dense: bool = False) -> dict:
    """A fresh interpreter per measurement, so peak RSS belongs to that measurement alone."""
    code = (f"import json, sys; sys.path.insert(0, {str(ROOT)!r}); sys.path.insert(0, {str(ROOT / 'bench')!r});"
            f"import attention_memory as m; print(json.dumps(m.{kind}_measurement({length}"
            f"{', ' + str(dense) if kind == 'block' else ''})))")
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (seconds)")
    parser.add_argument("--block-lengths", default=None, help="comma list (default 4096,8192,16384; '' skips)")
    parser.add_argument("--ring-lengths", default=None, help="comma list (default 16384,32768; '' skips)")
    parser.add_argument("--no-dense", action="store_true", help="skip the dense-mask reference")
    parser.add_argument("--out", default=str(RESULTS / "attention_memory_cpu"))
    args = parser.parse_args(argv)
    def lengths(given, quick, full):
        text = (quick if args.quick else full) if given is None else given
        return [int(x) for x in text.split(",") if x]          # "" skips that part
    block_lengths = lengths(args.block_lengths, "512,1024", "4096,8192,16384")
    ring_lengths = lengths(args.ring_lengths, "1024,2048", "16384,32768")
    rows = []
    from tqdm import tqdm
    jobs = [("block", t, False) for t in block_lengths]
    jobs += [] if args.no_dense else [("block", t, True) for t in block_lengths]
    jobs += [("ring", t, False) for t in ring_lengths]
    for kind, length, dense in tqdm(jobs, desc="attention memory"):
        rows.append({"kind": kind, **_in_subprocess(kind, length, dense)})
    print(f"{'kind':6} {'method':26} {'T':>7} {'growth MiB':>11} {'peak RSS MiB':>13} {'seconds':>8}")
    for r in rows:
        print(f"{r['kind']:6} {r['method']:26} {r['T']:>7} {r['growth_mib']:>11.0f} "
              f"{r.get('peak_rss_mib', float('nan')):>13.0f} {r['seconds']:>8.1f}")
    report = {"machine": f"{platform.machine()} CPU, {os.cpu_count()} cores, torch {torch.__version__}",
              "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    _plot(rows, out.with_suffix(".png"))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")
    return 0


def _plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    panels = ((axes[0], "block", "one attn block fwd+bwd, 8 packed docs", ("growth_mib",)),
              (axes[1], "ring", "ring SP sp=4, largest rank, fwd+bwd", ("peak_rss_mib", "growth_mib")))
    for ax, kind, title, fields in panels:
        for method in sorted({r["method"] for r in rows if r["kind"] == kind}):
            for name in fields:
                pts = [(r["T"], r[name]) for r in rows if r["kind"] == kind and r["method"] == method and name in r]
                label = method if len(fields) == 1 else f"{method}: {name.replace('_mib', '').replace('_', ' ')}"
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=label)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("T (tokens)")
        ax.set_ylabel("MiB")
        ax.set_title(title)
        if ax.lines:
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    sys.exit(main())
