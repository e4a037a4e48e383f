"""How close the planner's models are to measurements on this machine (CPU, fp32).

    python bench/plan_validation.py        # writes bench/results/plan_validation_cpu.{json,png}

Memory: planned peak vs the peak of live tensors that torch's MemTracker measures over a real training step
(forward, backward, AdamW) for the configurations of `tests/plan/memory_cases.py`. FLOPs: planned vs
`torch.utils.flop_counter` over one forward + backward of the model (matmul + recurrent families; the recurrent
custom ops are run through their implementations so the counter sees their matmuls, the fused attention op is
opaque to it) and, for the attention family, over the op's torch path run directly
(`tests/plan/test_flops.py`).
Communication needs no table: `tests/plan/test_comm_bytes.py` asserts equality with the gloo-counted bytes.
"""
from __future__ import annotations

import json
import platform
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402
from tqdm import tqdm  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lctrain.config import load_config  # noqa: E402
from lctrain.models import LanguageModel  # noqa: E402
from lctrain.plan.compute import flops_per_micro_step  # noqa: E402
from lctrain.plan.shape import model_shape  # noqa: E402
from tests.plan.measure import measured_peak_bytes  # noqa: E402
from tests.plan.memory_cases import CONFIGS  # noqa: E402
from tests.plan.test_flops import CASES as FLOP_CASES  # noqa: E402
from tests.plan.kernel_ops import IntoKernelOps  # noqa: E402
from tests.plan.test_flops import ROWS, SEQ_LEN, _addmm_flops  # noqa: E402
from tests.plan.test_memory import planned_peak_bytes  # noqa: E402


def counted_flops(overrides, checkpointing):
    cfg = load_config(None, overrides + [f"data.seq_len={SEQ_LEN}",
                                         f"model.activation_checkpointing={str(checkpointing).lower()}"])
    torch.manual_seed(0)
    model = LanguageModel(cfg.model).train()
    ids = torch.randint(0, cfg.model.vocab_size, (ROWS, SEQ_LEN))
    with FlopCounterMode(display=False, custom_mapping={torch.ops.aten.addmm_: _addmm_flops}) as counter, \
            IntoKernelOps():
        model(ids, torch.arange(SEQ_LEN).expand(ROWS, SEQ_LEN), labels=ids).loss_sum.backward()
    planned = flops_per_micro_step(model_shape(cfg), ROWS, SEQ_LEN, 1, "contiguous", checkpointing)
    return counter.get_total_flops(), planned["matmul"] + planned["recurrent"]


def counted_attention_flops(checkpointing):
    """The fused attention op's torch path under the counter vs the planner's attention family (one layer)."""
    import dataclasses

    from lctrain.kernels.attention.blockwise import blockwise_backward, blockwise_forward
    from lctrain.kernels.attention.pattern import Pattern
    from lctrain.plan.shape import LayerShape
    heads, kv_heads, dim, length = 8, 2, 64, 4096
    q = torch.randn(1, length, heads, dim)
    k, v = torch.randn(1, length, kv_heads, dim), torch.randn(1, length, kv_heads, dim)
    pattern = Pattern(True, (), (), dim ** -0.5)
    with FlopCounterMode(display=False) as counter:
        for _ in range(2 if checkpointing else 1):
            o, lse = blockwise_forward(q, k, v, pattern, None)
        blockwise_backward(q, k, v, o, lse, torch.randn_like(o), None, pattern, None)
    layer = LayerShape("attn", 0, heads=heads, kv_heads=kv_heads, head_dim=dim)
    shape = dataclasses.replace(model_shape(load_config(None, ["model.pattern=A", "model.n_layers=1"])),
                                layers=(layer,), layer_groups=((layer, 1),))
    planned = flops_per_micro_step(shape, 1, length, 1, "contiguous", checkpointing)["attention"]
    return counter.get_total_flops(), planned


def main() -> None:
    torch.set_num_threads(1)
    device = f"{platform.machine()} CPU, torch {torch.__version__}"
    memory, flops = [], []
    for name, (overrides, rows, seq_len, doc_len) in tqdm(CONFIGS.items(), desc="memory"):
        measured = measured_peak_bytes(overrides, rows, seq_len, doc_len)
        planned = planned_peak_bytes(overrides, rows, seq_len)
        memory.append({"config": name, "rows": rows, "seq_len": seq_len, "measured_mib": measured / 2**20,
                       "planned_mib": planned / 2**20, "ratio": planned / measured})
    for name, (overrides, checkpointing) in tqdm(FLOP_CASES.items(), desc="flops"):
        counted, planned = counted_flops(overrides, checkpointing)
        flops.append({"config": name, "counted": counted, "planned": planned, "ratio": planned / counted})
    for checkpointing in (False, True):
        counted, planned = counted_attention_flops(checkpointing)
        flops.append({"config": f"attention op 1x4096{' ckpt' if checkpointing else ''}", "counted": counted,
                      "planned": planned, "ratio": planned / counted})
    out = ROOT / "bench" / "results" / "plan_validation_cpu.json"
    out.write_text(json.dumps({"device": device, "memory": memory, "flops": flops}, indent=1) + "\n")
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for ax, rows, title in ((axes[0], memory, "peak memory: planned / measured"),
                            (axes[1], flops, "FLOPs: planned / flop_counter")):
        ax.bar([r["config"] for r in rows], [r["ratio"] for r in rows], color="C0")
        ax.axhline(1.0, color="k", linewidth=0.8)
        ax.set_ylim(0.7, 1.3)
        ax.set_title(f"{title} ({device})", fontsize=9)
        ax.tick_params(axis="x", labelrotation=35, labelsize=7)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)
    print("| config | rows x T | measured MiB | planned MiB | planned / measured |\n|---|---|---|---|---|")
    for r in memory:
        print(f"| {r['config']} | {r['rows']} x {r['seq_len']} | {r['measured_mib']:.1f} | {r['planned_mib']:.1f} | "
              f"{r['ratio']:.3f} |")
    print("\n| config | flop_counter | planned | planned / counted |\n|---|---|---|---|")
    for r in flops:
        print(f"| {r['config']} | {r['counted']:.3e} | {r['planned']:.3e} | {r['ratio']:.3f} |")
    print(f"\nwrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
