"""The attention section of the GPU check runs at smoke size on the CPU: every method is timed or says why not,
and the op agrees with the reference outputs."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"


def test_gpu_attention_section_smoke(tmp_path):
    # loaded from its file: bench/ never goes on sys.path (later subprocesses inherit the path)
    spec = importlib.util.spec_from_file_location("gpu_attention", BENCH / "gpu_attention.py")
    gpu_attention = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_attention)
    report = gpu_attention.run(tmp_path, smoke=True)
    assert json.loads((tmp_path / "gpu_attention.json").read_text()) == report
    cases = report["cases"]
    assert {(c["layout"], c["method"]) for c in cases} >= {("single", "sdpa causal"), ("packed", "flex attention")}
    ours = [c for c in cases if c["method"].startswith("lctrain")]
    assert {c["layout"] for c in ours} == {"single", "packed"}
    for case in ours:
        assert case["ms"] > 0 and case["tflops"] > 0
        assert case["max_abs_err_vs_reference"] < 1e-4
    for case in cases:  # every other method was measured, or the report says why not
        assert "ms" in case or "ms_forward_only" in case or case.get("skipped") or case.get("error")
