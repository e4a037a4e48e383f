"""lctrain vs Hugging Face transformers on the same model: one training step, steps alternated in one process.

    python bench/peers.py                 # CPU: d=256, 4 layers, 4 heads x 64, FFN 768, vocab 4096, B=4, T=2048
    python bench/peers.py --smoke         # tiny shapes, a few seconds (checks the harness, not the speed)
    bench/gpu_check.py (section peers) calls run(out_dir, smoke) on a GPU (bf16 autocast; the peer uses fla when
    it is installed)

Peers: pattern A (attention) <-> LlamaForCausalLM; GGGA (Gated DeltaNet 3:1 attention) and G (Gated DeltaNet
only, what a 6:1 hybrid is at 4 layers) <-> Qwen3NextForCausalLM with a dense MLP in every layer and full RoPE.
One step = forward + backward + AdamW on random tokens. Row "op": the Gated DeltaNet op alone (forward + backward)
vs the one Qwen3-Next calls, outputs compared first. Row "floor": GGGA with lctrain's GDN op replaced by a stand-in
that costs nothing, so peer / floor is the most any GDN op could gain on this machine.

Llama takes lctrain's weights one to one (the export's name mapping), and the two initial losses must agree before
anything is timed. Qwen3-Next's layers do not map (fused q/k/v/z projections, zero-centred norms, gated attention
with q/k norms), so both models keep their own initialisation with the same shapes; the bench checks that both
start at the loss of a uniform guess, ln(vocab).

lctrain runs with `model.kernel_recompute: false` unless `--kernel-recompute` is given: its recurrent ops then keep
their chunk tensors for backward instead of recomputing their forward, as the peer's torch implementation does
(autograd through every step), so both sides hold comparable activations.

Shared machines: before every step the bench waits (capped) until other processes use less than a threshold of the
CPU, and records the share they used during the step; medians are also given over the quiet steps only. Each step's
CPU time of this process (user + system) is recorded beside the wall time: on a busy machine it inflates far less
than wall time, so its ratio is the steadier comparison there (it still counts time the threads spin waiting).
Writes bench/results/peers_<cpu|gpu>[_smoke].json and a PNG beside it.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
# a script in bench/ could shadow a package transformers imports: drop the script directory.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
sys.path.insert(0, str(ROOT))

from bench.quiet import LoadMeter, wait_for_quiet  # noqa: E402
from lctrain.config import ModelConfig  # noqa: E402
from lctrain.models import LanguageModel  # noqa: E402

SHAPES = {"d_model": 256, "n_layers": 4, "n_heads": 4, "head_dim": 64, "ffn_dim": 768, "vocab_size": 4096,
          "batch": 4, "seq_len": 2048}
SMOKE_SHAPES = {**SHAPES, "batch": 2, "seq_len": 256, "vocab_size": 512}
PATTERNS = {"A": "LlamaForCausalLM", "GGGA": "Qwen3NextForCausalLM", "G": "Qwen3NextForCausalLM"}
QUIET_SHARE = 0.15  # a step counts as quiet when other processes used less than this share of the CPU


def lctrain_model(pattern: str, shapes: dict, **overrides) -> LanguageModel:
    cfg = ModelConfig(vocab_size=shapes["vocab_size"], d_model=shapes["d_model"], n_layers=shapes["n_layers"],
                      n_heads=shapes["n_heads"], head_dim=shapes["head_dim"], ffn_dim=shapes["ffn_dim"],
                      pattern=pattern, mixers={"gdn": {"head_k_dim": shapes["head_dim"],
                                                       "head_v_dim": 2 * shapes["head_dim"]}}, **overrides)
    return LanguageModel(cfg)


def llama_peer(model: LanguageModel, shapes: dict):
    """LlamaForCausalLM holding `model`'s weights (the export's layout)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lctrain.export import hf_config
    from lctrain.export.hf_export import hf_state_dict

    conf = hf_config.llama_config(model, {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0},
                                  max(shapes["seq_len"], 2048), "float32")
    for key in ("architectures", "model_type", "torch_dtype", "dtype"):
        conf.pop(key)
    peer = LlamaForCausalLM(LlamaConfig(**conf, attn_implementation="sdpa"))
    missing, unexpected = peer.load_state_dict(hf_state_dict(model, llama=True, dtype=torch.float32), strict=False)
    if unexpected or [m for m in missing if m != "lm_head.weight"]:
        raise RuntimeError(f"Llama weights do not map: missing {missing}, unexpected {unexpected}")
    peer.tie_weights()
    return peer


def qwen3_next_peer(pattern: str, shapes: dict):
    """Qwen3NextForCausalLM of the same shapes: GDN 4 heads (k 64, v 128), dense SwiGLU everywhere, full RoPE."""
    from transformers import Qwen3NextConfig, Qwen3NextForCausalLM

    layers = [("full_attention" if c == "A" else "linear_attention")
              for c in (pattern * shapes["n_layers"])[:shapes["n_layers"]]]
    conf = Qwen3NextConfig(
        vocab_size=shapes["vocab_size"], hidden_size=shapes["d_model"], intermediate_size=shapes["ffn_dim"],
        num_hidden_layers=shapes["n_layers"], num_attention_heads=shapes["n_heads"],
        num_key_value_heads=shapes["n_heads"], head_dim=shapes["head_dim"], layer_types=layers,
        linear_num_key_heads=shapes["n_heads"], linear_num_value_heads=shapes["n_heads"],
        linear_key_head_dim=shapes["head_dim"], linear_value_head_dim=2 * shapes["head_dim"],
        linear_conv_kernel_dim=4, num_experts=0, mlp_only_layers=list(range(shapes["n_layers"])),
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 1.0},
        tie_word_embeddings=True, max_position_embeddings=max(shapes["seq_len"], 2048), rms_norm_eps=1e-6,
        attn_implementation="sdpa")
    return Qwen3NextForCausalLM(conf)


def _lctrain_loss(model, ids, labels):
    out = model(ids, labels=labels)
    return out.loss_sum / out.n_targets


def _peer_loss(model, ids, labels):
    # transformers shifts the labels itself; no KV cache in training (Qwen3-Next's cannot hold GDN layers only)
    return model(input_ids=ids, labels=ids, use_cache=False).loss


def make_pair(pattern: str, shapes: dict, device: str, lctrain_overrides: dict | None = None) -> dict:
    torch.manual_seed(0)
    ours = lctrain_model(pattern, shapes, **(lctrain_overrides or {}))
    if pattern == "A":
        peer, mapped = llama_peer(ours, shapes), True
    else:
        peer, mapped = qwen3_next_peer(pattern, shapes), False
    return {"lctrain": ours.to(device), "peer": peer.to(device), "mapped": mapped, "peer_name": PATTERNS[pattern]}


def check_losses(pair: dict, ids, labels, autocast, tolerance: float) -> dict:
    with torch.no_grad(), autocast():
        ours = float(_lctrain_loss(pair["lctrain"], ids, labels))
        peer = float(_peer_loss(pair["peer"], ids, labels))
    uniform = math.log(pair["lctrain"].cfg.vocab_size)
    if pair["mapped"]:
        if abs(ours - peer) > tolerance * max(1.0, abs(peer)):
            raise AssertionError(f"initial losses differ: lctrain {ours:.6f} vs peer {peer:.6f}")
    elif abs(ours - uniform) > 0.05 * uniform or abs(peer - uniform) > 0.05 * uniform:
        raise AssertionError(f"initial losses not near ln(vocab)={uniform:.3f}: lctrain {ours:.4f}, peer {peer:.4f}")
    return {"lctrain": ours, "peer": peer, "same_weights": pair["mapped"], "uniform": uniform}


def time_alternated(steps_fns: dict, steps: int, warmup: int, device: str, wait_s: float) -> dict:
    """Run every side's step function in turn (the order flips each round), `warmup` rounds untimed."""
    records = {name: [] for name in steps_fns}
    for rnd in range(warmup + steps):
        order = list(steps_fns) if rnd % 2 == 0 else list(reversed(steps_fns))  # neither side always goes first
        for name in order:
            quiet = wait_for_quiet(QUIET_SHARE, wait_s) if device == "cpu" and wait_s > 0 else {}
            meter = LoadMeter()
            meter.start()
            t0, c0 = time.perf_counter(), time.process_time()
            loss = steps_fns[name]()
            if device == "cuda":
                torch.cuda.synchronize()
            elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
            share = meter.stop() if device == "cpu" else None
            if rnd >= warmup:
                records[name].append({"step_s": elapsed, "cpu_s": cpu, "others_share": share,
                                      "waited_s": quiet.get("waited_s"), "loss": loss})
    return records


def time_pair(pair: dict, ids, labels, steps: int, warmup: int, device: str, autocast, wait_s: float,
              profile_to: Path | None = None) -> dict:
    """Alternated timed steps; with `profile_to`, afterwards one more step of each side under torch.profiler, its
    top ops (self time, grouped by input shape) written to `profile_to`<side>.txt."""
    sides = {"lctrain": (pair["lctrain"], _lctrain_loss), "peer": (pair["peer"], _peer_loss)}
    optims = {name: torch.optim.AdamW(m.parameters(), lr=1e-4) for name, (m, _) in sides.items()}

    def step_fn(name):
        model, loss_fn = sides[name]

        def step():
            with autocast():
                loss = loss_fn(model, ids, labels)
            loss.backward()
            optims[name].step()
            optims[name].zero_grad(set_to_none=True)
            return float(loss.detach())
        return step

    records = time_alternated({name: step_fn(name) for name in sides}, steps, warmup, device, wait_s)
    if profile_to is not None:
        from torch.profiler import ProfilerActivity, profile
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
        for name in sides:
            with profile(activities=activities, record_shapes=True) as prof:
                step_fn(name)()
            averages = [prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30),
                        prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total",
                                                                           row_limit=40)]
            Path(f"{profile_to}{name}.txt").write_text("\n\n".join(averages))
    return records


def gdn_op_row(shapes: dict, device: str, steps: int, warmup: int, wait_s: float, recompute: bool = False) -> dict:
    """The Gated DeltaNet op alone, forward + backward: lctrain.kernels.gated_delta_rule (default backend) vs
    the one Qwen3-Next runs (fla's chunk_gated_delta_rule on a GPU when importable, else transformers' torch one)."""
    from transformers.models.qwen3_next import modeling_qwen3_next as qn

    from lctrain.kernels import gated_delta_rule as gdn
    from lctrain.kernels.opaque import kernel_recompute

    def gated_delta_rule(*args):
        with kernel_recompute(recompute):
            return gdn(*args)

    if device == "cuda" and fla_available():
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule as peer_fn
        peer_name = "fla chunk_gated_delta_rule"
    else:
        peer_fn, peer_name = qn.torch_chunk_gated_delta_rule, "transformers torch_chunk_gated_delta_rule"
    batch, seqlen, heads, dk = shapes["batch"], shapes["seq_len"], shapes["n_heads"], shapes["head_dim"]
    gen = torch.Generator().manual_seed(2)

    def leaf(*shape, fn=lambda x: x):
        return fn(torch.randn(*shape, generator=gen)).to(device).requires_grad_()

    q = leaf(batch, seqlen, heads, dk, fn=lambda x: torch.nn.functional.normalize(x, dim=-1))
    k = leaf(batch, seqlen, heads, dk, fn=lambda x: torch.nn.functional.normalize(x, dim=-1))
    v = leaf(batch, seqlen, heads, 2 * dk)
    g = leaf(batch, seqlen, heads, fn=lambda x: -torch.nn.functional.softplus(x) * 0.1)
    beta = leaf(batch, seqlen, heads, fn=torch.sigmoid)
    with torch.no_grad():
        ours = gated_delta_rule(q, k, v, g, beta)[0]
        peer = peer_fn(q, k, v, g, beta)[0]
    max_diff = float((ours.float() - peer.float()).abs().max())
    if max_diff > 1e-3:
        raise AssertionError(f"gated_delta_rule outputs differ from the peer's by {max_diff:.3g}")

    def step(fn):
        def run():
            o = fn(q, k, v, g, beta)[0]
            o.float().square().sum().backward()
            for x in (q, k, v, g, beta):
                x.grad = None
            return None
        return run

    records = time_alternated({"lctrain": step(gated_delta_rule), "peer": step(peer_fn)}, steps, warmup, device,
                              wait_s)
    return _row(f"GDN op (B={batch}, T={seqlen}, H={heads}, K={dk}, V={2 * dk})", peer_name,
                {"max_abs_diff": max_diff}, records)


def summarise(records: list[dict]) -> dict:
    times = [r["step_s"] for r in records]
    quiet = [r["step_s"] for r in records if r["others_share"] is None or r["others_share"] < QUIET_SHARE]
    shares = [r["others_share"] for r in records if r["others_share"] is not None]
    cpu = [r["cpu_s"] for r in records]
    return {"median_s": statistics.median(times), "min_s": min(times), "cpu_median_s": statistics.median(cpu),
            "cpu_min_s": min(cpu),
            "quiet_median_s": statistics.median(quiet) if quiet else None, "quiet_steps": len(quiet),
            "steps": len(times), "mean_others_share": statistics.mean(shares) if shares else None,
            "total_wait_s": sum(r["waited_s"] or 0.0 for r in records)}


@contextlib.contextmanager
def gdn_op_free():
    """lctrain's GDN op replaced by a stand-in that costs nothing: o = v, with q, k and the gates kept in the graph
    at the cost of a sum, so every projection still runs forward and backward.
    A step timed under it is a floor for lctrain's step; the peer's time over it bounds the speedup any GDN
    op could give (the dense matmuls, attention layers and the loss are the same work on both sides)."""
    from lctrain.models.mixers import gated_deltanet

    def free(name, q, k, v, ctx, layer_cache, backend=None, recompute=True, **gates):
        touch = q.sum() + k.sum() + sum(g.sum() for g in gates.values() if g is not None)
        return v + 0.0 * touch

    original = gated_deltanet.run_linear_op
    gated_deltanet.run_linear_op = free
    try:
        yield
    finally:
        gated_deltanet.run_linear_op = original


def run_pattern(pattern: str, shapes: dict, device: str, steps: int, warmup: int, wait_s: float,
                lctrain_overrides: dict | None = None, profile_to: Path | None = None, op_free: bool = False) -> dict:
    if op_free:  # a floor for lctrain's step: see gdn_op_free
        with gdn_op_free():
            row = run_pattern(pattern, shapes, device, steps, warmup, wait_s, lctrain_overrides)
        row["pattern"] = f"{pattern} (floor: GDN op free)"
        return row
    pair = make_pair(pattern, shapes, device, lctrain_overrides)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, shapes["vocab_size"], (shapes["batch"], shapes["seq_len"]), generator=gen).to(device)
    labels = torch.full_like(ids, -100)
    labels[:, :-1] = ids[:, 1:]  # lctrain takes aligned targets; the peer shifts `ids` itself
    bf16 = device == "cuda"

    def autocast():
        return torch.autocast(device, dtype=torch.bfloat16, enabled=bf16)

    losses = check_losses(pair, ids, labels, autocast, tolerance=2e-2 if bf16 else 1e-4)
    records = time_pair(pair, ids, labels, steps, warmup, device, autocast, wait_s, profile_to)
    return _row(pattern, pair["peer_name"], losses, records)


def _row(pattern: str, peer_name: str, check: dict, records: dict) -> dict:
    ours, peer = summarise(records["lctrain"]), summarise(records["peer"])
    row = {"pattern": pattern, "peer": peer_name, "initial_loss": check, "lctrain": ours, "peer_time": peer,
           "speedup_median": peer["median_s"] / ours["median_s"], "speedup_min": peer["min_s"] / ours["min_s"],
           "cpu_speedup_median": peer["cpu_median_s"] / ours["cpu_median_s"],
           "cpu_speedup_min": peer["cpu_min_s"] / ours["cpu_min_s"], "steps": records}
    if ours["quiet_median_s"] and peer["quiet_median_s"]:
        row["speedup_quiet_median"] = peer["quiet_median_s"] / ours["quiet_median_s"]
    return row


def machine(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    import os
    return f"{os.cpu_count()}-core {platform.machine()} CPU, torch {torch.__version__}"


def fla_available() -> bool:
    try:
        import fla  # noqa: F401
        return True
    except ImportError:
        return False


def table(result: dict) -> str:
    lines = ["| pattern | peer | lctrain median / min (s) | peer median / min (s) | speedup median / min | "
             "CPU-time speedup median / min | quiet steps (ours/peer) | others' CPU share | check |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        o, p = r["lctrain"], r["peer_time"]
        share = "/".join(f"{x['mean_others_share']:.2f}" if x["mean_others_share"] is not None else "n/a"
                         for x in (o, p))
        lines.append(f"| {r['pattern']} | {r['peer']} | {o['median_s']:.3f} / {o['min_s']:.3f} | "
                     f"{p['median_s']:.3f} / {p['min_s']:.3f} | {r['speedup_median']:.2f}x / {r['speedup_min']:.2f}x | "
                     f"{r['cpu_speedup_median']:.2f}x / {r['cpu_speedup_min']:.2f}x | "
                     f"{o['quiet_steps']}/{o['steps']}, {p['quiet_steps']}/{p['steps']} | {share} | "
                     f"{_check(r['initial_loss'])} |")
    return "\n".join(lines)


def _check(check: dict) -> str:
    if "max_abs_diff" in check:
        return f"max abs output diff {check['max_abs_diff']:.1e}"
    same = "same weights" if check["same_weights"] else "own init, ln(V)=" + f"{check['uniform']:.3f}"
    return f"initial loss {check['lctrain']:.5f} / {check['peer']:.5f} ({same})"


TARGETS = {"A": 1.15, "GGGA": 2.0}  # the speedups this benchmark is meant to show on the CPU


def _short(row: dict) -> str:
    peer = row["peer"].replace("ForCausalLM", "").replace("transformers torch_chunk_gated_delta_rule", "HF torch op")
    name = "GGGA, GDN\nop free" if "floor" in row["pattern"] else row["pattern"].split(" (")[0]
    if row["pattern"].startswith("GDN op"):
        name += " T=" + row["pattern"].split("T=")[1].split(",")[0]
    return f"{name}\nvs {peer.replace('fla chunk_gated_delta_rule', 'fla op')}"


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    width = 0.38
    for offset, key, label in ((-width / 2, "speedup_median", "wall time"), (width / 2, "cpu_speedup_median",
                                                                              "CPU time")):
        values = [r[key] for r in rows]
        bars = ax.bar([i + offset for i in range(len(rows))], values, width, label=f"median {label}")
        for bar, value in zip(bars, values):
            ax.text(bar.get_x() + bar.get_width() / 2, value * 1.01, f"{value:.2f}", ha="center", fontsize=8)
    for i, r in enumerate(rows):
        if r["pattern"] in TARGETS:
            ax.plot([i - width, i + width], [TARGETS[r["pattern"]]] * 2, "k--", linewidth=1)
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_xticks(range(len(rows)), [_short(r) for r in rows], fontsize=8)
    ax.set_ylabel("peer time / lctrain time")
    s = result["shapes"]
    models = any(not r["pattern"].startswith("GDN op") for r in rows)  # op rows name their own T
    length = f" T={s['seq_len']}" if models else ""
    ax.set_title(f"fwd+bwd{'(+AdamW)' if models else ''}, B={s['batch']}{length}, {result['threads']} thread(s), "
                 f"{result['dtype']}"
                 f"\n{result['device']} (dashed: target)", fontsize=8)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(out_dir: str | Path, smoke: bool = False, patterns=("A", "GGGA", "op"), steps: int | None = None,
        warmup: int | None = None, wait_s: float = 30.0, lctrain_overrides: dict | None = None, tag: str = "",
        threads: int = 0, profile: bool = False, write: bool = True) -> dict:
    """Measure every pattern on the available device; writes peers_<cpu|gpu>[_smoke]<tag>.{json,png} to out_dir
    (with `profile`: also the profiler tables of one step per side, peers_profile_<pattern>_<side>.txt; with
    `write` false nothing is written: the caller keeps the returned result).
    On a GPU the models run under bf16 autocast; whether fla was importable (the peer's fast path) is recorded."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    shapes = SMOKE_SHAPES if smoke else SHAPES
    steps = steps or (1 if smoke else (5 if device == "cpu" else 20))
    if warmup is None:  # GPU: Triton autotuning, allocator; --smoke checks the harness, not the speed
        warmup = 0 if smoke else (1 if device == "cpu" else 3)
    if device == "cpu" and threads:
        torch.set_num_threads(threads)
    lctrain_overrides = {"kernel_recompute": False, **(lctrain_overrides or {})}
    if profile:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
    wait = 0.0 if smoke else wait_s  # --smoke checks the harness: no quiet-machine wait
    rows = []
    for pattern in patterns:
        if pattern == "op" or pattern.startswith("op:"):  # op:<T>: the op at sequence length T
            length = int(pattern[3:]) if pattern.startswith("op:") else shapes["seq_len"]
            rows.append(gdn_op_row({**shapes, "seq_len": length}, device, steps, warmup,
                                   wait, lctrain_overrides["kernel_recompute"]))
        elif pattern == "floor":
            rows.append(run_pattern("GGGA", shapes, device, steps, warmup, wait,
                                    lctrain_overrides, op_free=True))
        else:
            rows.append(run_pattern(pattern, shapes, device, steps, warmup, wait,
                                    lctrain_overrides,
                                    Path(out_dir) / f"peers_profile_{pattern}{tag}_" if profile else None))
        print(f"{pattern}: lctrain {rows[-1]['lctrain']['median_s']:.3f}s vs {rows[-1]['peer']} "
              f"{rows[-1]['peer_time']['median_s']:.3f}s -> {rows[-1]['speedup_median']:.2f}x", flush=True)
    import transformers
    result = {"device": machine(device), "threads": torch.get_num_threads(), "dtype": "bf16" if device == "cuda"
              else "fp32", "transformers": transformers.__version__, "fla_on_peer": fla_available(),
              "shapes": shapes, "quiet_threshold": QUIET_SHARE, "max_wait_s": wait_s, "rows": rows,
              "lctrain_overrides": lctrain_overrides or {}}
    print(table(result))
    if not write:
        return result
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"peers_{'gpu' if device == 'cuda' else 'cpu'}{'_smoke' if smoke else ''}{tag}"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    plot(result, out / f"{stem}.png")
    return result


def _op_length(pattern: str) -> bool:
    """`op:<T>` with T a positive integer (the GDN op row at sequence length T)."""
    return pattern.startswith("op:") and pattern[3:].isdigit() and int(pattern[3:]) > 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes: checks the harness, not the speed")
    parser.add_argument("--patterns", default="A,GGGA,G,floor,op",
                        help="comma list from: " + ", ".join(PATTERNS) + ", op (the GDN op alone), op:<T> (the op "
                        "at sequence length T), floor (GGGA with lctrain's GDN op free: the most any GDN op could "
                        "gain)")
    parser.add_argument("--steps", type=int, default=0, help="timed steps per side (default 5 on CPU)")
    parser.add_argument("--max-wait", type=float, default=30.0,
                        help="cap on the quiet-machine wait per step (s); 0: no wait (--smoke never waits)")
    parser.add_argument("--loss-chunk-tokens", type=int, default=None,
                        help="lctrain's model.loss_chunk_tokens for this run (default: the config default)")
    parser.add_argument("--kernel-recompute", action="store_true",
                        help="lctrain's model.kernel_recompute: true (recurrent ops recompute their forward in backward)")
    parser.add_argument("--profile", action="store_true",
                        help="after timing, profile one step per side: peers_profile_<pattern>_<side>.txt in --out")
    parser.add_argument("--tag", default="", help="suffix of the output files")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = parser.parse_args()
    patterns = [p for p in args.patterns.split(",") if p]
    bad = [p for p in patterns if p not in PATTERNS and p not in ("op", "floor") and not _op_length(p)]
    if bad:
        allowed = ", ".join([*PATTERNS, "op", "op:<T>", "floor"])
        print(f"peers: --patterns {','.join(bad)} has no peer; allowed: {allowed}", file=sys.stderr)
        sys.exit(2)
    overrides = {"kernel_recompute": args.kernel_recompute}
    if args.loss_chunk_tokens is not None:
        overrides["loss_chunk_tokens"] = args.loss_chunk_tokens
    run(args.out, args.smoke, patterns, args.steps or None, wait_s=args.max_wait, lctrain_overrides=overrides,
        tag=args.tag, threads=args.threads, profile=args.profile)


if __name__ == "__main__":
    main()
