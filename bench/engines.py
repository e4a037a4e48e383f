"""Per-rank peak memory and step time of the training engines on the same model: ddp, DeepSpeed ZeRO-1/2/3, fsdp.

    python bench/engines.py --quick          # CPU reduced mode: 2 gloo ranks, a ~30M-parameter hybrid model
    python bench/engines.py --world 8        # GPUs (one process per GPU, nccl): the hybrid_3to1 recipe's width

Each engine runs in fresh processes (so one engine's allocations do not hide another's): the model is built (on
meta for fsdp), the engine wraps it, then `--warmup` + `--steps` optimizer steps of forward + backward + update run
on random tokens through the loop's protocol (micro_step / backward / step). Reported per rank: median step time
and peak memory: on CUDA the allocator's peak; on CPU the growth of the process's peak RSS from just before the
model is built (weights, gradients, optimizer state, communication buffers and activations, plus allocator slack).
Writes bench/results/engines_<cpu|gpu>.json and a PNG beside it.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ENGINES = {"ddp": ["train.engine=ddp"], "zero1": ["train.engine=deepspeed", "deepspeed.zero_stage=1"],
           "zero2": ["train.engine=deepspeed", "deepspeed.zero_stage=2"],
           "zero3": ["train.engine=deepspeed", "deepspeed.zero_stage=3"], "fsdp": ["train.engine=fsdp"]}
CPU_MODEL = ["model.d_model=512", "model.n_layers=8", "model.n_heads=8", "model.n_kv_heads=4", "model.ffn_dim=1408",
             "model.pattern=GGGA", "model.vocab_size=8192",
             "model.mixers={gdn: {n_heads: 4, head_k_dim: 64, head_v_dim: 128}}"]


def peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _worker(rank: int, world: int, port: int, out_dir: str, engine_name: str, overrides: list, seq_len: int,
            micro: int, warmup: int, steps: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    from lctrain.config import load_config
    from lctrain.models import LanguageModel
    from lctrain.models.init import parameters_on_meta
    from lctrain.train.dist import init_distributed
    from lctrain.train.engine import build_engine
    from lctrain.train.loop import plan_layout

    result = {}
    try:
        env = init_distributed("auto")
        cfg = load_config(None, [*overrides, *ENGINES[engine_name], f"data.seq_len={seq_len}",
                                 f"train.micro_batch_size={micro}", "train.grad_clip=1.0"])
        if env.device.type == "cpu":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        torch.manual_seed(0)
        if env.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(env.device)
        before = peak_bytes(env.device)
        if cfg.train.engine == "fsdp":
            with parameters_on_meta():
                model = LanguageModel(cfg.model)
        else:
            model = LanguageModel(cfg.model).to(env.device)
        layout = plan_layout(cfg, env)
        engine = build_engine(model, cfg, env, layout)
        gen = torch.Generator().manual_seed(rank)
        times = []
        for step in range(warmup + steps):
            tokens = torch.randint(0, cfg.model.vocab_size, (micro, seq_len + 1), generator=gen).to(env.device)
            if env.device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            with engine.micro_step(last=True):
                out = engine.model(tokens[:, :-1], labels=tokens[:, 1:])
                loss_sum = out[0] if isinstance(out, tuple) else out.loss_sum
                engine.backward(loss_sum, layout.world / (micro * seq_len * layout.world))
            engine.step(float(loss_sum.detach()) / (micro * seq_len))
            if env.device.type == "cuda":
                torch.cuda.synchronize()
            if step >= warmup:
                times.append(time.perf_counter() - t0)
        result = {"step_time_s": statistics.median(times), "peak_gib": (peak_bytes(env.device) - before) / 2**30,
                  "params": model.num_parameters() if hasattr(model, "num_parameters") else None}
    except Exception:  # noqa: BLE001 - recorded in the table: one engine failing does not stop the others
        result = {"error": traceback.format_exc().strip().splitlines()[-1]}
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    if dist.is_initialized():
        dist.destroy_process_group()


def run_engine(name: str, world: int, overrides: list, args, port: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_worker, args=(world, port, out, name, overrides, args.seq_len, args.micro, args.warmup,
                                args.steps), nprocs=world, join=True)
        return [json.load(open(os.path.join(out, f"rank{r}.json"))) for r in range(world)]


def plot(payload: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in payload["results"] if "peak_gib" in r]
    names = [r["engine"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
    ax1.bar(names, [max(r["peak_gib"]) for r in rows], color="tab:blue")
    ax1.set_ylabel("peak memory per rank (GiB, max over ranks)")
    ax2.bar(names, [r["step_time_s"] for r in rows], color="tab:orange")
    ax2.set_ylabel("median step time (s)")
    fig.suptitle(f"engines, {payload['world']} ranks, {payload['params'] / 1e6:.0f}M parameters "
                 f"({payload['machine']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CPU reduced mode")
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--engines", default=",".join(ENGINES))
    parser.add_argument("--seq-len", type=int, default=0, help="default: 256 on CPU, 8192 on GPU")
    parser.add_argument("--micro", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--d-model", type=int, default=0, help="CPU model width (default 512)")
    parser.add_argument("--out-dir", default=str(ROOT / "bench" / "results"))
    args = parser.parse_args()
    on_gpu = torch.cuda.is_available() and not args.quick
    args.seq_len = args.seq_len or (8192 if on_gpu else 256)
    overrides = ["model.vocab_size=32000"] if on_gpu else CPU_MODEL + (
        [f"model.d_model={args.d_model}", f"model.ffn_dim={args.d_model * 11 // 4 // 64 * 64}"] if args.d_model else [])
    if on_gpu:
        from lctrain.config import load_config
        recipe = load_config(ROOT / "recipes" / "hybrid_3to1.yaml")
        overrides = [f"model.{k}={getattr(recipe.model, k)}" for k in
                     ("d_model", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "pattern")] + overrides
    machine = (torch.cuda.get_device_name(0) if on_gpu else
               f"{os.cpu_count()}-core {platform.machine()} CPU, torch {torch.__version__}")
    results = []
    for i, name in enumerate(args.engines.split(",")):
        per_rank = run_engine(name, args.world, overrides, args, 29400 + i + int(time.time()) % 500)
        errors = [r["error"] for r in per_rank if "error" in r]
        row = {"engine": name}
        if errors:
            row["error"] = errors[0]
            print(f"{name:6s} failed: {errors[0]}", flush=True)
        else:
            row.update(step_time_s=statistics.median(r["step_time_s"] for r in per_rank),
                       peak_gib=[round(r["peak_gib"], 3) for r in per_rank], params=per_rank[0]["params"])
            print(f"{name:6s} step {row['step_time_s']:.3f} s   peak per rank "
                  f"{', '.join(f'{g:.2f}' for g in row['peak_gib'])} GiB", flush=True)
        results.append(row)
    params = next((r["params"] for r in results if r.get("params")), 0)
    payload = {"machine": machine, "world": args.world, "seq_len": args.seq_len, "micro_batch": args.micro,
               "params": params, "overrides": overrides, "date": datetime.date.today().isoformat(),
               "results": results}
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"engines_{'gpu' if on_gpu else 'cpu'}"
    (out / f"{stem}.json").write_text(json.dumps(payload, indent=1) + "\n")
    plot(payload, out / f"{stem}.png")
    print(f"| engine | median step (s) | peak per rank (GiB) |\n|---|---|---|")
    for r in results:
        print(f"| {r['engine']} | " + (f"{r['step_time_s']:.3f} | {max(r['peak_gib']):.2f} |" if "peak_gib" in r
                                       else f"failed: {r['error']} | |"))
    print(out / f"{stem}.json")


if __name__ == "__main__":
    main()
