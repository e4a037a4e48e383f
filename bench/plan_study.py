"""Scale study with `lctrain plan`: the 3:1 GatedDeltaNet : attention hybrids at 32K-1M tokens on 8, 64 and 512 GPUs.

    python bench/plan_study.py                 # H100, writes bench/results/plan_study_h100.{json,png}
    python bench/plan_study.py --gpu h200
    python bench/plan_study.py --quick         # the shipped 335M recipe only, 32K-128K, 8 and 64 GPUs

Models: `recipes/hybrid_3to1.yaml` (335M) and every other `recipes/hybrid_3to1*.yaml`; while no 1.3B / 7B recipe
is shipped, the study widens the 335M recipe by overrides (same pattern, head sizes and vocabulary) to 1.3B and 7B
shapes and says so. Global batch: one sample per GPU per step (tokens_per_step = T x GPUs), so per-GPU numbers
compare across lengths. Everything here is the planner's model (no GPU was measured); see docs/RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from tqdm import tqdm  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lctrain.cli import find_recipe  # noqa: E402
from lctrain.config import load_config  # noqa: E402
from lctrain.plan.candidate import Candidate, Workload  # noqa: E402
from lctrain.plan.comm import layer_bytes  # noqa: E402
from lctrain.plan.gpus import GPUS, load_measured_efficiency  # noqa: E402
from lctrain.plan.search import plan  # noqa: E402
from lctrain.plan.shape import model_shape  # noqa: E402

RESULTS = ROOT / "bench" / "results"
K = 1024
LENGTHS = [32 * K, 64 * K, 128 * K, 256 * K, 512 * K, 1024 * K]
GPU_COUNTS = [8, 64, 512]
WIDER = {  # the 335M recipe widened by overrides while no 1.3B / 7B recipe is shipped
    "1.3B (override)": ["model.d_model=2048", "model.n_heads=16", "model.n_kv_heads=8", "model.ffn_dim=5632",
                        "model.mixers={gdn: {n_heads: 8, head_k_dim: 128, head_v_dim: 256}}"],
    "7B (override)": ["model.d_model=4096", "model.n_layers=32", "model.n_heads=32", "model.n_kv_heads=8",
                      "model.ffn_dim=14336", "model.mixers={gdn: {n_heads: 16, head_k_dim: 128, head_v_dim: 256}}"],
}
MODES = ("allgather", "ring", "ulysses")


def models(quick: bool) -> list[tuple[str, str, list[str]]]:
    out = [("335M", "hybrid_3to1", [])]
    if quick:
        return out
    shipped = sorted(p.stem for p in (ROOT / "recipes").glob("hybrid_3to1?*.yaml"))
    out += [(stem, stem, []) for stem in shipped]
    if not shipped:
        out += [(name, "hybrid_3to1", overrides) for name, overrides in WIDER.items()]
    return out


def summary(entry: dict | None) -> dict | None:
    if entry is None:
        return None
    keys = ("dp", "sp", "attn", "layout", "engine", "activation_checkpointing", "micro_batch_size", "grad_accum",
            "memory_gib", "comm_bytes_per_step", "dp_comm_bytes_per_step", "step_time_s", "tokens_per_s", "mfu")
    return {k: entry[k] for k in keys}


def study_point(cfg_of, shape, gpus: int, seq_len: int, gpu) -> dict:
    cfg = cfg_of(seq_len, gpus)
    result = plan(cfg, gpus, gpu, shape=shape)
    fitting = [e for e in result["candidates"] if e["fits"]]
    per_mode = {}
    for mode in MODES:
        mine = [e for e in fitting if e["sp"] > 1 and e["attn"] == mode]
        per_mode[mode] = summary(max(mine, key=lambda e: e["tokens_per_s"])) if mine else None
    no_sp = [e for e in fitting if e["sp"] == 1]
    per_mode["none (sp=1)"] = summary(max(no_sp, key=lambda e: e["tokens_per_s"])) if no_sp else None
    return {"gpus": gpus, "seq_len": seq_len, "best": summary(result["best"]), "best_per_mode": per_mode,
            "fitting": len(fitting), "candidates": len(result["candidates"])}


def longest(cfg_of, shape, gpus: int, gpu, limit: int) -> dict:
    """Longest power-of-two length (from 32K, up to `limit`) at which some candidate fits; `at_limit` when the
    search stopped at the limit rather than at a length that does not fit."""
    best, seq_len = None, 32 * K
    while seq_len <= limit:
        result = plan(cfg_of(seq_len, gpus), gpus, gpu, shape=shape)
        if result["best"] is None:
            break
        best = {"seq_len": seq_len, "at_limit": seq_len * 2 > limit, **summary(result["best"])}
        seq_len *= 2
    return best


def traffic_curves(shape, sp_sizes=(8, 64)) -> dict:
    """Bytes per layer per micro-batch (one sample, bf16, zigzag, no checkpointing) against the length."""
    attn = next(layer for layer, _ in shape.grouped() if layer.type == "attn")
    gdn = next(layer for layer, _ in shape.grouped() if layer.type == "gdn")
    out = {}
    for sp in sp_sizes:
        lengths = [2 ** e for e in range(10, 22) if 2 ** e >= 2 * sp]
        rows = []
        for seq_len in lengths:
            row = {"seq_len": seq_len,
                   "lasp2_gdn": layer_bytes(gdn, 1, seq_len, sp, "zigzag", "ring", 2, False)["linear"],
                   "gdn_conv_halo": layer_bytes(gdn, 1, seq_len, sp, "zigzag", "ring", 2, False)["conv"]}
            for mode in MODES:
                row[mode] = layer_bytes(attn, 1, seq_len, sp, "zigzag", mode, 2, False)["attn"]
            rows.append(row)
        crossover = {mode: next((r["seq_len"] for r in rows if r[mode] > r["lasp2_gdn"]), None) for mode in MODES}
        out[str(sp)] = {"rows": rows, "attention_exceeds_lasp2_from": crossover}
    return out


def markdown(data: dict) -> str:
    lines = []
    for model in data["models"]:
        lines += [f"\n### {model['name']} ({model['params'] / 1e6:,.0f}M parameters): best configuration per GPU count "
                  "and length", "",
                  "| GPUs | T | dp x sp | attn | layout | engine | ckpt | GiB | tok/s/GPU | MFU | best per SP mode "
                  "(tok/s/GPU: allgather / ring / ulysses / sp=1) |", "|" + "---|" * 11]
        for point in model["points"]:
            b = point["best"]
            modes = " / ".join("-" if point["best_per_mode"][m] is None else
                               f"{point['best_per_mode'][m]['tokens_per_s']:,.0f}"
                               for m in MODES + ("none (sp=1)",))
            if b is None:
                lines.append(f"| {point['gpus']} | {point['seq_len'] // K}K | does not fit | | | | | | | | {modes} |")
                continue
            lines.append(f"| {point['gpus']} | {point['seq_len'] // K}K | {b['dp']} x {b['sp']} | "
                         f"{b['attn'] if b['sp'] > 1 else '-'} | {b['layout'] if b['sp'] > 1 else '-'} | "
                         f"{b['engine']} | {'on' if b['activation_checkpointing'] else 'off'} | "
                         f"{b['memory_gib']:.1f} | {b['tokens_per_s']:,.0f} | {100 * b['mfu']:.1f}% | {modes} |")
        lines += ["", "| GPUs | longest trainable T | dp x sp | attn | engine | ckpt | GiB | tok/s/GPU |",
                  "|" + "---|" * 8]
        for gpus, entry in model["longest"].items():
            if entry is None:
                lines.append(f"| {gpus} | below 32K | | | | | | |")
                continue
            lines.append(f"| {gpus} | {'>= ' if entry['at_limit'] else ''}{entry['seq_len'] // K:,}K | "
                         f"{entry['dp']} x {entry['sp']} | "
                         f"{entry['attn'] if entry['sp'] > 1 else '-'} | {entry['engine']} | "
                         f"{'on' if entry['activation_checkpointing'] else 'off'} | {entry['memory_gib']:.1f} | "
                         f"{entry['tokens_per_s']:,.0f} |")
    traffic = data["models"][0]["traffic"]
    lines += ["", f"### Bytes per layer and micro-batch, {data['models'][0]['name']} (one sample, bf16, zigzag)", "",
              "| sp | T | LASP-2 (gdn) | allgather | ring | ulysses |", "|---|---|---|---|---|---|"]
    for sp, curves in traffic.items():
        for row in curves["rows"]:
            if row["seq_len"] in (4 * K, 32 * K, 256 * K, 1024 * K):
                lines.append(f"| {sp} | {row['seq_len'] // K}K | {row['lasp2_gdn'] / 1e6:,.1f} MB | "
                             + " | ".join(f"{row[m] / 1e6:,.1f} MB" for m in MODES) + " |")
        lines.append(f"| {sp} | attention exceeds LASP-2 from | | "
                     + " | ".join(f"{(v or 0) // K}K" if v and v >= K else str(v) for v in
                                  curves["attention_exceeds_lasp2_from"].values()) + " |")
    return "\n".join(lines)


def plot(data: dict, path: Path) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    styles = ["-", "--", ":"]
    for i, model in enumerate(data["models"]):
        for gpus in sorted({p["gpus"] for p in model["points"]}):
            pts = [p for p in model["points"] if p["gpus"] == gpus and p["best"]]
            axes[0].plot([p["seq_len"] for p in pts], [p["best"]["tokens_per_s"] for p in pts], styles[i % 3],
                         marker="o", markersize=3, label=f"{model['name']}, {gpus} GPUs")
    axes[0].set(xscale="log", yscale="log", xlabel="sequence length T", ylabel="tokens/s per GPU (best plan)",
                title=f"best plan per length ({data['gpu']})")
    axes[0].legend(fontsize=6)
    for sp, ls in zip(data["models"][0]["traffic"], ("-", "--")):
        rows = data["models"][0]["traffic"][sp]["rows"]
        x = [r["seq_len"] for r in rows]
        for key, color in (("lasp2_gdn", "k"), ("allgather", "C0"), ("ring", "C1"), ("ulysses", "C2")):
            axes[1].plot(x, [r[key] for r in rows], ls, color=color, label=f"{key}, sp={sp}")
    axes[1].set(xscale="log", yscale="log", xlabel="sequence length T", ylabel="bytes per layer per micro-batch",
                title=f"SP traffic per layer, {data['models'][0]['name']}")
    axes[1].legend(fontsize=6)
    for i, model in enumerate(data["models"]):
        gpus = [int(g) for g, e in model["longest"].items() if e]
        axes[2].plot(gpus, [model["longest"][str(g)]["seq_len"] for g in gpus], styles[i % 3], marker="o",
                     label=model["name"])
    axes[2].set(xscale="log", yscale="log", xlabel="GPUs", ylabel="longest trainable T",
                title="longest sequence that fits")
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", default="h100", choices=sorted(GPUS))
    parser.add_argument("--quick", action="store_true", help="335M only, 32K-128K, 8 and 64 GPUs")
    parser.add_argument("--out", default=None, help="JSON path (default bench/results/plan_study_<gpu>.json)")
    args = parser.parse_args()
    gpu = load_measured_efficiency(GPUS[args.gpu], args.gpu)
    lengths = LENGTHS[:3] if args.quick else LENGTHS
    counts = GPU_COUNTS[:2] if args.quick else GPU_COUNTS
    data = {"gpu": gpu.name, "efficiency": gpu.efficiency, "efficiency_source": gpu.efficiency_source,
            "global_batch": "one sample per GPU per step (tokens_per_step = T x GPUs)", "models": []}
    jobs = [(m, g, t) for m in models(args.quick) for g in counts for t in lengths]
    progress = tqdm(total=len(jobs) + len(models(args.quick)) * len(counts), desc="plans")
    for name, recipe, overrides in models(args.quick):
        def cfg_of(seq_len, gpus, recipe=recipe, overrides=overrides):
            return load_config(find_recipe(recipe), overrides + [f"data.seq_len={seq_len}",
                                                                 f"train.tokens_per_step={seq_len * gpus}"])
        shape = model_shape(cfg_of(32 * K, 8))
        entry = {"name": name, "recipe": recipe, "overrides": overrides, "params": shape.n_params, "points": [],
                 "longest": {}, "traffic": traffic_curves(shape)}
        for gpus in counts:
            for seq_len in lengths:
                entry["points"].append(study_point(cfg_of, shape, gpus, seq_len, gpu))
                progress.update()
            entry["longest"][str(gpus)] = longest(cfg_of, shape, gpus, gpu, (4 if args.quick else 256) * 1024 * K)
            progress.update()
        data["models"].append(entry)
    progress.close()
    suffix = "_quick" if args.quick else ""
    out = Path(args.out) if args.out else RESULTS / f"plan_study_{args.gpu}{suffix}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=1) + "\n")
    plot(data, out.with_suffix(".png"))
    print(markdown(data))
    print(f"\nwrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
