"""GPU specifications and the efficiencies the time model assumes.

Peaks are dense bf16 tensor-core FLOP/s (no sparsity) from the vendors' data sheets (SXM parts). Memory is what
`torch.cuda.get_device_properties().total_memory` reports, in GiB. `intra_bw` is NVLink bandwidth per GPU and
direction, `inter_bw` the network bandwidth per GPU and direction (one 400 Gb/s NIC per GPU on H100/H200/B200
systems, 200 Gb/s on A100), both in bytes/s.

Efficiencies are fractions of the peak a kernel family reaches in training (fwd + bwd), and of the link bandwidth a
collective reaches. The defaults are typical published numbers for these kernels (large bf16 GEMMs ~60%, flash
attention fwd+bwd ~45%, chunked linear-attention Triton kernels ~25%, NCCL bus bandwidth ~80% of the link); a
`bench/gpu_check.py` result file that carries `"plan_efficiency": {family: fraction}` replaces them (see
`load_measured_efficiency`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

GiB = 2 ** 30

DEFAULT_EFFICIENCY = {
    "matmul": 0.60,       # projections, MLP, LM head
    "attention": 0.45,    # the fused attention op forward + backward (flash-style; SP blocks included)
    "recurrent": 0.25,    # chunked GDN / linear-attention kernels
    "memory": 0.70,       # fraction of HBM bandwidth reached by element-wise work (norms, activations, optimizer)
    "network": 0.80,      # fraction of link bandwidth reached by collectives
}


@dataclass(frozen=True)
class GPU:
    name: str
    memory_gib: float
    peak_flops: float
    hbm_bw: float
    intra_bw: float
    inter_bw: float
    efficiency: dict = field(default_factory=lambda: dict(DEFAULT_EFFICIENCY))
    efficiency_source: str = "defaults"


GPUS = {
    "h100": GPU("H100 SXM 80GB", 79.1, 989e12, 3.35e12, 450e9, 50e9),
    "h200": GPU("H200 SXM 141GB", 139.8, 989e12, 4.8e12, 450e9, 50e9),
    "a100": GPU("A100 SXM 80GB", 79.1, 312e12, 2.0e12, 300e9, 25e9),
    "b200": GPU("B200 180GB", 178.4, 2250e12, 8.0e12, 900e9, 50e9),
}

RESULTS_DIR = Path(__file__).resolve().parent.parent.parent / "bench" / "results"


def load_measured_efficiency(gpu: GPU, key: str, results_dir: Path = RESULTS_DIR) -> GPU:
    """Replace default efficiencies by measured ones from `bench/results/gpu_check*.json` for this GPU.

    A file counts when its `"device"` (or `"gpu"`) string contains the GPU's short name (e.g. "H100") and it holds
    `"plan_efficiency": {"matmul": 0.55, ...}`; the newest such file wins, families it lacks keep their defaults.
    """
    short = key.upper()
    found = []
    for path in sorted(results_dir.glob("gpu_check*.json")) if results_dir.is_dir() else []:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        device = str(data.get("device", data.get("gpu", "")))
        measured = data.get("plan_efficiency")
        if short in device.upper() and isinstance(measured, dict):
            found.append((path.stat().st_mtime, path, measured))
    if not found:
        return gpu
    _, path, measured = max(found)
    efficiency = dict(gpu.efficiency)
    efficiency.update({k: float(v) for k, v in measured.items() if k in efficiency and 0 < float(v) <= 1})
    return replace(gpu, efficiency=efficiency, efficiency_source=path.name)
