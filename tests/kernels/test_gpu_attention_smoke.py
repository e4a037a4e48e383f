"""The attention section of the GPU check runs at smoke size on the CPU: every method is timed or says why not,
and the op agrees with the reference outputs."""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))


def test_gpu_attention_section_smoke(tmp_path):
    import gpu_attention
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
