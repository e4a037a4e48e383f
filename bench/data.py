"""Data pipeline at scale: time to the first batch (cold and warm cache, and streaming), tokenisation throughput per
worker, peak RSS per rank and cache size, on a generated jsonl corpus.

    python bench/data.py                          # 1 GB in 50 files (the default), 1 and 2 processes
    python bench/data.py --size-mb 64 --files 16  # smaller, for a quick reading
    python bench/data.py --baseline-tree DIR      # also time another checkout's data pipeline (cold, 1 process)
    python bench/data.py --loader-memory          # only per-rank loader memory: 1M and 2M documents, 1/2/3/4/6 ranks

Every measurement runs in fresh processes (`--child` mode), ranks as separate processes with RANK/WORLD_SIZE set,
each timing `build_data` + the first `next(loader)`; a cold run starts from an empty cache, a warm one reuses it.
Writes bench/results/data_<device>.json and .png; the table goes to stdout (markdown, for docs/RESULTS.md).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

T_START = time.perf_counter()
ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
WORDS = ("the of and to in is that for it as was with be by on not he this are or his from at which but have an "
         "they you were her she there been one all we their has would when if so no will more can said what up "
         "river stone cloud light night code data model token window alpha beta gamma delta kernel state").split()


def make_corpus(directory: Path, size_mb: int, files: int, seed: int = 0) -> int:
    """`files` jsonl files of about `size_mb` MiB in all; documents of 50-2000 words. Returns the bytes."""
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    per_file = size_mb * 2**20 // files
    total = 0
    for i in range(files):
        with open(directory / f"part-{i:04d}.jsonl", "w") as out:
            written = 0
            while written < per_file:
                n = rng.randint(50, 2000)
                text = " ".join(rng.choice(WORDS) for _ in range(n))
                line = json.dumps({"text": text}) + "\n"
                out.write(line)
                written += len(line)
            total += written
    return total


def child(args) -> None:
    """One rank: build the data, take one batch, print a JSON line."""
    sys.path.insert(0, args.tree)
    from lctrain.config import load_config
    from lctrain.data import build_data

    cfg = load_config(None, args.overrides)
    import torch  # noqa: F401 - imported here so that `import_s` holds the start-up a training process pays
    from lctrain.data import packing  # noqa: F401

    t0, cpu0 = time.perf_counter(), time.process_time()
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    data = build_data(cfg, dp_rank=rank, dp_size=world, progress=False)
    next(data.train)
    seconds = time.perf_counter() - t0
    build = getattr(data, "plan", {}).get("build", {})
    print("RESULT " + json.dumps({
        "rank": rank, "seconds": seconds, "import_s": t0 - T_START, "import_cpu_s": cpu0,
        "rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "workers_rss_mib": max(build.get("worker_rss_mib") or [0.0]),
        "built": build.get("built", 0), "built_bytes": build.get("bytes", 0),
        "cpu_s": sum(getattr(resource.getrusage(who), f) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
                     for f in ("ru_utime", "ru_stime")),
        "shard_seconds": build.get("shard_seconds", []),
        "shard_cpu_seconds": build.get("shard_cpu_seconds", [])}), flush=True)


def run_ranks(tree: Path, overrides: list[str], world: int) -> dict:
    """Start `world` rank processes at once; wall time until the last has its first batch."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONPATH=str(tree),
               WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
    t0 = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, __file__, "--child", "--tree", str(tree), "--", *overrides],
                              env=dict(env, RANK=str(r)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(world)]
    outs = [p.communicate() for p in procs]
    wall = time.perf_counter() - t0
    ranks = []
    for p, (out, err) in zip(procs, outs):
        lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
        if p.returncode != 0 or not lines:
            raise RuntimeError(f"rank failed ({p.returncode}): {err[-2000:]}")
        ranks.append(json.loads(lines[-1][7:]))
    return {"wall_s": wall, "ranks": ranks}


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=1024)
    parser.add_argument("--files", type=int, default=50)
    parser.add_argument("--baseline-tree", default="", help="another checkout to time cold with 1 process")
    parser.add_argument("--work", default="", help="where the corpus and caches go (default: a temp dir)")
    parser.add_argument("--name", default="data_cpu", help="results file name (bench/results/NAME.json/.png)")
    parser.add_argument("--loader-memory", action="store_true",
                        help="only measure per-rank loader memory and the epoch boundary (see loader_memory)")
    parser.add_argument("--docs", type=int, default=1_000_000, help="--loader-memory: N (N and 2N are measured)")
    parser.add_argument("--memory-child", default="", help=argparse.SUPPRESS)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--tree", default=str(ROOT), help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    if args.memory_child:
        memory_child(*json.loads(args.memory_child))
        return
    if args.loader_memory:
        loader_memory(args)
        return
    work = Path(args.work or tempfile.mkdtemp(prefix="lctrain-data-bench-"))
    corpus = work / "corpus"
    if not corpus.is_dir():
        make_corpus(corpus, args.size_mb, args.files)
    corpus_bytes = du(corpus)
    base = [f"data.sources=[{{type: jsonl, path: {corpus}}}]", "data.seq_len=512", "data.vocab_size=4096",
            "data.tokenizer_sample_chars=2000000", "train.micro_batch_size=4"]
    tokenizer_cache = work / "tokcache"
    # Train the tokenizer once and pin it: every case then times tokenising, not tokenizer training.
    run_ranks(ROOT, [*base, f"data.cache_dir={tokenizer_cache}", "data.max_documents=200"], 1)
    model = next((tokenizer_cache / "tokenizers").glob("*/tokenizer.model"))
    base.append(f"data.tokenizer={model}")
    rows = []

    def case(name: str, tree: Path, world: int, workers: int, cache: Path, cold: bool) -> None:
        if cold:
            shutil.rmtree(cache, ignore_errors=True)
        overrides = [*base, f"data.cache_dir={cache}"] + ([f"data.num_workers={workers}"] if tree == ROOT else [])
        result = run_ranks(tree, overrides, world)
        shard_seconds = [s for r in result["ranks"] for s in r["shard_seconds"]]
        built = sum(r["built_bytes"] for r in result["ranks"])
        row = {"case": name, "processes": world, "workers_per_process": workers, "cold": cold,
               "first_batch_s": round(result["wall_s"], 2),
               "startup_s": round(max(r["import_s"] for r in result["ranks"]), 2),
               "peak_rss_mib_per_rank": round(max(r["rss_mib"] for r in result["ranks"]), 1),
               "peak_worker_rss_mib": round(max(r["workers_rss_mib"] for r in result["ranks"]), 1),
               "cache_mib": round(du(cache) / 2**20, 1)}
        row["cpu_s_all_ranks"] = round(sum(r["cpu_s"] for r in result["ranks"]), 1)
        # per process: CPU-s of start-up (interpreter, torch, lctrain) and of tokenising, which is what splits
        row["startup_cpu_s_per_process"] = [round(r.get("import_cpu_s", 0.0), 2) for r in result["ranks"]]
        row["tokenise_cpu_s_per_process"] = [round(sum(r["shard_cpu_seconds"]), 2) for r in result["ranks"]]
        if shard_seconds and built:
            row["mib_per_s_per_worker"] = round(built / 2**20 / sum(shard_seconds), 2)
            cpu = sum(s for r in result["ranks"] for s in r["shard_cpu_seconds"])
            row["mib_per_cpu_s"] = round(built / 2**20 / max(cpu, 1e-9), 2)
        rows.append(row)
        print(json.dumps(row), flush=True)

    new_cache = work / "cache"
    case("1 process, 1 worker", ROOT, 1, 1, new_cache, cold=True)
    case("1 process, 2 workers", ROOT, 1, 2, new_cache, cold=True)
    case("2 processes, 1 worker each", ROOT, 2, 1, new_cache, cold=True)
    case("warm, 1 process", ROOT, 1, 1, new_cache, cold=False)
    case("warm, 2 processes", ROOT, 2, 1, new_cache, cold=False)
    base_streaming = [*base, "data.streaming=true"]
    saved_base = list(base)
    base[:] = base_streaming
    case("streaming, 1 process", ROOT, 1, 1, work / "cache-streaming", cold=True)
    case("streaming, 2 processes", ROOT, 2, 1, work / "cache-streaming", cold=True)
    base[:] = saved_base
    extra = corpus / f"part-{args.files:04d}.jsonl"  # one new shard: only it is tokenised
    make_corpus(work / "extra", max(1, args.size_mb // args.files), 1, seed=99)
    shutil.copy(work / "extra" / "part-0000.jsonl", extra)
    case("one shard added, 1 process", ROOT, 1, 1, new_cache, cold=False)
    extra.unlink()
    if args.baseline_tree:
        case("baseline checkout, 1 process", Path(args.baseline_tree), 1, 1, work / "cache-baseline", cold=True)
        case("baseline checkout, 2 processes", Path(args.baseline_tree), 2, 1, work / "cache-baseline", cold=True)

    machine = f"{platform.machine()} CPU, {os.cpu_count()} cores"
    payload = {"machine": machine, "device": "cpu", "corpus_mib": round(corpus_bytes / 2**20, 1),
               "files": args.files, "rows": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{args.name}.json"
    out.write_text(json.dumps(payload, indent=1))
    plot(out)
    print(f"\ncorpus: {payload['corpus_mib']} MiB jsonl in {args.files} files; {machine}\n")
    print("| case | cold | first batch (s) | of which start-up (s) | CPU s, all processes | CPU s per process: "
          "start-up / tokenising | peak RSS / rank (MiB) | worker RSS (MiB) | MiB/s per worker (wall) | MiB per CPU-s "
          "| cache (MiB) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        split = ", ".join(f"{a} / {b}" for a, b in zip(r["startup_cpu_s_per_process"],
                                                       r["tokenise_cpu_s_per_process"]))
        print(f"| {r['case']} | {'yes' if r['cold'] else 'no'} | {r['first_batch_s']} | {r['startup_s']} "
              f"| {r['cpu_s_all_ranks']} | {split} | {r['peak_rss_mib_per_rank']} | {r['peak_worker_rss_mib']} "
              f"| {r.get('mib_per_s_per_worker', '')} | {r.get('mib_per_cpu_s', '')} | {r['cache_mib']} |")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


# ------------------------------------------------------------------------------------ per-rank loader memory
def write_entries(root: Path, n_docs: int, per_entry: int, seed: int = 0) -> list[Path]:
    """Shard entries in the cache's on-disk format holding `n_docs` documents of 20-300 tokens (tokens.bin is a
    sparse file: the loader reads only what its windows need)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    paths = []
    for e in range(0, n_docs, per_entry):
        n = min(per_entry, n_docs - e)
        path = root / f"entry-{e // per_entry:04d}"
        path.mkdir(parents=True, exist_ok=True)
        offsets = np.concatenate([[0], np.cumsum(rng.integers(20, 300, size=n))]).astype(np.int64)
        np.save(path / "offsets.npy", offsets)
        np.save(path / "doc_hash.npy", rng.integers(0, 2**63, size=n, dtype=np.uint64))
        with open(path / "tokens.bin", "wb") as out:
            out.truncate(int(offsets[-1]) * 2)
        (path / "meta.json").write_text(json.dumps({"dtype": "uint16", "docs": n, "skipped": 0}))
        paths.append(path)
    return paths


def memory_child(entry_dirs: list[str], world: int, seq_len: int, micro_batch: int) -> None:
    """Rank 0 of `world`: heap held by the loader (tracemalloc) after every lane it owns was read, and the step
    times around its lanes' first epoch boundary."""
    import tracemalloc

    import numpy as np

    from lctrain.data.corpus import TrainSlots
    from lctrain.data.loader import TrainLoader
    from lctrain.data.shard_cache import ShardEntry

    entries = [ShardEntry(Path(d)) for d in entry_dirs]
    warm = TrainLoader([TrainSlots(entries[:1], 0.05)], [1.0], seq_len, micro_batch, 0, 0, world, 2, 3, "w")
    next(warm)  # imports and first-use allocations happen outside the measurement
    del warm
    tracemalloc.start()
    cpu0 = time.process_time()
    slots = TrainSlots(entries, 0.05)
    loader = TrainLoader([slots], [1.0], seq_len, micro_batch, 0, 0, world, 2, 3, "x")
    order = loader.order
    loader.order.prefetch = False
    for _ in range(-(-order.lanes // micro_batch)):  # rank 0 reads each of its lanes at least once
        next(loader)
    cpu_s = time.process_time() - cpu0
    traced = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    arrays = order.held_bytes()
    lanes_held = len(order.held_lanes())
    # Epoch boundary. Training runs half an epoch between a lane's prefetch and its boundary; here: jump past
    # every lane's half-way point, read each lane once (which queues its next epoch), let the background thread
    # finish, then jump to 8 steps before the first lane's boundary and time every step across all of them.
    loader.order.prefetch = True
    step = world * micro_batch
    ends = [lane.segment(0).tokens // seq_len * order.lanes + lane.index for lane in order.held_lanes()]
    loader.position = (max(ends) // 2 // step + 1) * step
    for _ in range(-(-order.lanes // micro_batch)):
        next(loader)
    for lane in order.held_lanes():
        for future in list(lane.pending.values()):
            future.result()
    loader.position = (min(ends) // step - 8) * step
    built_before = sum(lane.built for lane in order.held_lanes())
    times = []
    while loader.position <= max(ends) + step:
        t0 = time.perf_counter()
        next(loader)
        times.append(time.perf_counter() - t0)
    synchronous = sum(lane.built for lane in order.held_lanes()) - built_before
    print("RESULT " + json.dumps({
        "docs": slots.n_slots, "train_docs": slots.n_train, "world": world, "lanes": order.lanes,
        "lanes_held": lanes_held, "order_array_bytes": arrays, "traced_bytes": traced, "cpu_s": round(cpu_s, 2),
        "boundary_steps": len(times), "boundary_step_ms_median": round(1e3 * float(np.median(times)), 2),
        "boundary_step_ms_max": round(1e3 * max(times), 2), "docs_ordered_synchronously_at_boundary": synchronous,
    }), flush=True)


def loader_memory(args) -> None:
    work = Path(args.work or tempfile.mkdtemp(prefix="lctrain-loader-memory-"))
    rows = []
    for n_docs in (args.docs, 2 * args.docs):
        entry_dirs = [str(p) for p in write_entries(work / f"docs-{n_docs}", n_docs, 125_000)]
        for world in (1, 2, 3, 4, 6):
            spec = json.dumps([entry_dirs, world, 512, 4])
            proc = subprocess.run([sys.executable, __file__, "--memory-child", spec], capture_output=True, text=True,
                                  env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT)))
            lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
            if proc.returncode != 0 or not lines:
                raise RuntimeError(proc.stderr[-2000:])
            row = json.loads(lines[-1][7:])
            row["traced_bytes_per_doc"] = round(row["traced_bytes"] / row["docs"], 2)
            rows.append(row)
            print(json.dumps(row), flush=True)
    machine = f"{platform.machine()} CPU, {os.cpu_count()} cores"
    payload = {"machine": machine, "device": "cpu", "seq_len": 512, "micro_batch_size": 4, "rows": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "data_loader_memory_cpu.json"
    out.write_text(json.dumps(payload, indent=1))
    plot_memory(out)
    print(f"\n{machine}; rank 0's loader after reading each of its lanes (tracemalloc)\n")
    print("| documents | ranks | lanes (held by rank 0) | order arrays (MiB) | all loader heap (MiB) | bytes / "
          "document of the corpus | CPU s to start | boundary step ms (median / max) | documents ordered synchronously at "
          "the boundary |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['docs']:,} | {r['world']} | {r['lanes']} ({r['lanes_held']}) | "
              f"{r['order_array_bytes'] / 2**20:.2f} | {r['traced_bytes'] / 2**20:.2f} | {r['traced_bytes_per_doc']} "
              f"| {r['cpu_s']} | {r['boundary_step_ms_median']} / {r['boundary_step_ms_max']} "
              f"| {r['docs_ordered_synchronously_at_boundary']} |")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


def plot_memory(path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(path.read_text())
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for docs in sorted({r["docs"] for r in data["rows"]}):
        rows = [r for r in data["rows"] if r["docs"] == docs]
        ax.plot([r["world"] for r in rows], [r["traced_bytes"] / 2**20 for r in rows], "o-",
                label=f"{docs:,} documents")
    ax.set_xscale("log", base=2)
    ax.set_xticks([1, 2, 3, 4, 6], ["1", "2", "3", "4", "6"])
    ax.set_xlabel("data-parallel ranks")
    ax.set_ylabel("loader heap on rank 0 (MiB)")
    ax.set_title(f"per-rank loader memory ({data['machine']})", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    png = path.with_suffix(".png")
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def plot(path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(path.read_text())
    rows = data["rows"]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.barh([r["case"] for r in rows][::-1], [r["first_batch_s"] for r in rows][::-1],
            color=["tab:blue" if r["cold"] else "tab:green" for r in rows][::-1])
    ax.set_xlabel("seconds to the first batch")
    ax.set_title(f"{data['corpus_mib']} MiB jsonl, {data['files']} files ({data['machine']})", fontsize=9)
    fig.tight_layout()
    png = path.with_suffix(".png")
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


if __name__ == "__main__":
    main()
