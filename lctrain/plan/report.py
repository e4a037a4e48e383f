"""The plan as a table for people and as JSON for scripts."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

COLUMNS = ("dp", "sp", "attn", "layout", "engine", "ckpt", "mb", "accum", "GiB", "SP MB/step", "step s",
           "tok/s/GPU", "MFU")


def _gb(n: int) -> str:
    return f"{n / 1e6:,.0f}"


def _row(entry: dict, mark: str, has_attn: bool = True) -> list[str]:
    comm = entry["comm_bytes_per_step"] or {}
    split = entry["sp"] > 1   # attention mode and layout only matter under sequence parallelism
    return [f"{mark}{entry['dp']}", str(entry["sp"]), entry["attn"] if split and has_attn else "-",
            entry["layout"] if split else "-", entry["engine"],
            "on" if entry["activation_checkpointing"] else "off", str(entry["micro_batch_size"]),
            str(entry.get("grad_accum", "-")), f"{entry['memory_gib']:.1f}", _gb(sum(comm.values())),
            f"{entry['step_time_s']:.2f}", f"{entry['tokens_per_s']:,.0f}", f"{100 * entry['mfu']:.1f}%"]


def _same(a: dict, b: dict) -> bool:
    keys = ("dp", "sp", "attn", "layout", "engine", "activation_checkpointing", "micro_batch_size")
    return b is not None and all(a[k] == b[k] for k in keys)


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in rows)


def format_plan(result: dict, top: int = 15) -> str:
    best, current = result["best"], result["current"]
    fitting = [e for e in result["candidates"] if e["fits"]]
    has_attn = "attn" in result["model"]["layers"]
    lines = [f"# plan: {result['gpus']} x {result['gpu']} ({result['gpus_per_node']} per node), "
             f"{result['model']['params'] / 1e6:,.1f}M parameters, seq_len {result['workload']['seq_len']:,}, "
             f"{result['workload']['tokens_per_step']:,} tokens per step; efficiencies: {result['efficiency_source']}"]
    if fitting:
        rows = [list(COLUMNS)]
        for entry in fitting[:top]:
            rows.append(_row(entry, "*" if _same(entry, best) else ">" if _same(entry, current) else " ", has_attn))
        if not any(_same(e, current) for e in fitting[:top]) and current["fits"]:
            rows.append(_row(current, ">", has_attn))
        lines += [_table(rows), f"{len(fitting)} of {len(result['candidates'])} candidates fit; "
                  f"* best, > the recipe's configuration; SP MB/step: rank 0's linear + attn + conv traffic"]
    else:
        lines.append("no candidate fits: more GPUs, a shorter data.seq_len or a smaller model")
    if current["fits"]:
        if best is not None and not _same(current, best):
            lines.append(f"recipe's configuration: {current['tokens_per_s']:,.0f} tok/s/GPU, best is "
                         f"{best['tokens_per_s'] / current['tokens_per_s']:.2f}x faster")
    else:
        lines.append("recipe's configuration (dp {dp} x sp {sp}, {attn}, {engine}) cannot run: {why}".format(
            **current, why="; ".join(current["ruled_out"])))
    reasons = Counter(r.split(":")[0].split(" needs")[0].split(" is not")[0].split(" exceeds")[0]
                      for e in result["candidates"] if not e["fits"] for r in e["ruled_out"][:1])
    examples = {}
    for e in result["candidates"]:
        if not e["fits"]:
            examples.setdefault(e["ruled_out"][0].split(":")[0].split(" needs")[0].split(" is not")[0]
                                .split(" exceeds")[0], e["ruled_out"][0])
    for reason, count in reasons.most_common():
        lines.append(f"ruled out ({count}): {examples[reason]}")
    return "\n".join(lines)


def write_json(result: dict, path: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=1) + "\n")
