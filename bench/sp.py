"""Sequence-parallel benchmark: forward + backward time and traffic of one layer on W processes.

    python bench/sp.py --quick                      # CPU, gloo, 4 processes, short sequences
    python bench/sp.py                              # T = 16K ... 256K
    torchrun --nproc-per-node 4 bench/sp.py --backend nccl   # GPUs (also works without torchrun)

Linear layer: LASP-2 (`sp_linear_attention`, one AllGather of state summaries) against LASP-1, the ring-style
baseline below (each rank waits for the state of the previous rank, then passes its own on: W sequential
steps). Softmax layer: `sp_attention` with allgather, ring and ulysses (zigzag layout). Prints a table, writes
`bench/results/sp_<cpu|gpu>.json` and a PNG plot next to it.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lctrain.kernels import linear_attention  # noqa: E402
from lctrain.parallel import comm, init_sp_groups, shard_batch, sp_attention, sp_linear_attention  # noqa: E402

FULL_LENGTHS = [16384, 32768, 65536, 131072, 262144]
QUICK_LENGTHS = [1024, 2048, 4096, 8192]


# ------------------------------------------------------------------------------------------- LASP-1 baseline
def lasp1_forward_backward(q, k, v, log_decay, grad_o, groups, backend):
    """Ring-style state passing for a contiguous layout (B = 1, one document): rank r receives the state from
    r-1, runs its chunk, sends its final state to r+1; backward passes the state gradient from r+1 to r-1.
    Returns the local output. Traffic: one state each way per rank, but W sequential hops."""
    rank, world = groups.sp_rank, groups.sp_size
    state_shape = (1, q.shape[2], q.shape[3], v.shape[3])
    entering = torch.zeros(state_shape, dtype=torch.float32, device=q.device)
    if rank > 0:
        comm.exchange([], [(entering, rank - 1)], groups, "linear")
    entering.requires_grad_(True)
    o, final = linear_attention(q, k, v, log_decay=log_decay, initial_state=entering, output_final_state=True,
                                backend=backend)
    if rank < world - 1:
        comm.exchange([(final.detach().contiguous(), rank + 1)], [], groups, "linear")
    grad_final = torch.zeros_like(final)
    if rank < world - 1:
        comm.exchange([], [(grad_final, rank + 1)], groups, "linear")
    torch.autograd.backward([o, final], [grad_o, grad_final])
    if rank > 0:
        comm.exchange([(entering.grad.contiguous(), rank - 1)], [], groups, "linear")
    return o


# ---------------------------------------------------------------------------------------------- one config
def _positions(length, device):
    return torch.arange(length, device=device)[None]          # one document over the whole sequence


def _time(step, repeats, device):
    step()                                                    # warm-up (also the byte count below)
    comm.comm_stats(reset=True)
    times = []
    for _ in range(repeats):
        dist.barrier()
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        dist.barrier()
        times.append(time.perf_counter() - start)
    stats = comm.comm_stats(reset=True)
    per_step = sum(value for key, value in stats.items() if key.startswith("comm_bytes")) // repeats
    busiest = torch.tensor([per_step], dtype=torch.float64, device=device)
    dist.all_reduce(busiest, op=dist.ReduceOp.MAX)            # the rank that moves the most bytes
    return statistics.median(times), int(busiest.item())


def bench_linear(method, length, args, groups, device):
    layout = "contiguous"
    local, placement = shard_batch({"position_ids": _positions(length, device)}, groups.sp_rank, groups.sp_size,
                                   layout, groups=groups)
    tl, h, d = placement.local_len, args.heads, args.head_dim
    q, k, v = (torch.randn(1, tl, h, d, device=device, dtype=args.dtype, requires_grad=True) for _ in range(3))
    log_decay = (-torch.rand(1, tl, h, device=device) * 0.1).requires_grad_(True)
    grad_o = torch.randn(1, tl, h, d, device=device, dtype=args.dtype)

    def step():
        if method == "lasp2":
            o = sp_linear_attention(q, k, v, log_decay=log_decay, placement=placement, backend=args.op_backend)
            o.backward(grad_o)
        else:
            lasp1_forward_backward(q, k, v, log_decay, grad_o, groups, args.op_backend)
    return _time(step, args.repeats, device)


def bench_softmax(method, length, args, groups, device):
    local, placement = shard_batch({"position_ids": _positions(length, device)}, groups.sp_rank, groups.sp_size,
                                   "zigzag", groups=groups)
    tl = placement.local_len
    q = torch.randn(1, tl, args.heads, args.head_dim, device=device, dtype=args.dtype, requires_grad=True)
    k, v = (torch.randn(1, tl, args.kv_heads, args.head_dim, device=device, dtype=args.dtype, requires_grad=True)
            for _ in range(2))
    grad_o = torch.randn_like(q)

    def step():
        sp_attention(q, k, v, placement, method).backward(grad_o)
    return _time(step, args.repeats, device)


# ---------------------------------------------------------------------------------------------------- main
def _worker(rank, args):
    if args.launched:
        dist.init_process_group(args.backend)
    else:
        dist.init_process_group(args.backend, init_method=f"tcp://127.0.0.1:{args.port}", rank=rank,
                                world_size=args.world)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cpu")
    if args.backend == "nccl":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(max(1, args.threads))
    torch.manual_seed(0)
    groups = init_sp_groups(world)
    rows = []
    plan = [("linear", m) for m in ("lasp2", "lasp1")] + [("softmax", m) for m in ("allgather", "ring", "ulysses")]
    for length in args.lengths:
        for layer, method in plan:
            if args.layers and layer not in args.layers:
                continue
            fn = bench_linear if layer == "linear" else bench_softmax
            seconds, traffic = fn(method, length, args, groups, device)
            row = {"layer": layer, "method": method, "seq_len": length, "world": world,
                   "ms": round(seconds * 1e3, 3), "comm_bytes": traffic}
            rows.append(row)
            if rank == 0:
                print(f"{layer:8s} {method:10s} T={length:7d}  {row['ms']:10.1f} ms  "
                      f"{row['comm_bytes'] / 2**20:10.3f} MiB/rank", flush=True)
    if rank == 0:
        _write(rows, args, device)
    dist.barrier()
    dist.destroy_process_group()


def _write(rows, args, device):
    name = "gpu" if device.type == "cuda" else "cpu"
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"backend": args.backend, "world": args.world, "heads": args.heads, "kv_heads": args.kv_heads,
            "head_dim": args.head_dim, "dtype": str(args.dtype), "op_backend": args.op_backend,
            "repeats": args.repeats, "quick": args.quick,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (gloo)",
            "bytes": "sent + received by the busiest rank for one forward + backward"}
    (out / f"sp_{name}.json").write_text(json.dumps({"meta": meta, "results": rows}, indent=1))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for col, layer in enumerate(("linear", "softmax")):
        for method in sorted({r["method"] for r in rows if r["layer"] == layer}):
            sel = [r for r in rows if r["layer"] == layer and r["method"] == method]
            xs = [r["seq_len"] for r in sel]
            axes[0, col].plot(xs, [r["ms"] for r in sel], marker="o", label=method)
            axes[1, col].plot(xs, [max(r["comm_bytes"], 1) / 2**20 for r in sel], marker="o", label=method)
        for row, label in ((0, "fwd+bwd time (ms)"), (1, "traffic per rank (MiB)")):
            axes[row, col].set(xscale="log", yscale="log", xlabel="sequence length", ylabel=label,
                               title=f"{layer} layer, {args.world} ranks, {meta['device']}")
            if axes[row, col].lines:
                axes[row, col].legend()
    fig.tight_layout()
    fig.savefig(out / f"sp_{name}.png", dpi=110)
    print(f"wrote {out / f'sp_{name}.json'} and {out / f'sp_{name}.png'}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"T = {QUICK_LENGTHS} instead of {FULL_LENGTHS}")
    parser.add_argument("--lengths", type=lambda s: [int(x) for x in s.split(",")], default=None)
    parser.add_argument("--backend", choices=("gloo", "nccl"), default="gloo")
    parser.add_argument("--world", type=int, default=4, help="processes to spawn (ignored under torchrun)")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--layers", type=lambda s: s.split(","), default=None, help="linear,softmax")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None)
    parser.add_argument("--op-backend", default=None, help="kernel backend of the linear op (default: auto)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process on CPU")
    parser.add_argument("--port", type=int, default=29517)
    parser.add_argument("--out-dir", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args(argv)
    args.lengths = args.lengths or (QUICK_LENGTHS if args.quick else FULL_LENGTHS)
    args.dtype = getattr(torch, args.dtype or ("bfloat16" if args.backend == "nccl" else "float32"))
    args.launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    if args.launched:
        args.world = int(os.environ["WORLD_SIZE"])
        _worker(int(os.environ["RANK"]), args)
    else:
        mp.spawn(_worker, args=(args,), nprocs=args.world, join=True)


if __name__ == "__main__":
    main()
