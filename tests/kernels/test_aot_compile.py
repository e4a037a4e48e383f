"""Ahead-of-time compile check of the `linear_attention` Triton kernels for sm_80 and sm_90 (no GPU needed).

The compiler cannot see through the interpreter that the test session runs under, so the check runs in a
subprocess with TRITON_INTERPRET unset and a fresh kernel cache (every kernel is really compiled).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from lctrain.kernels import aot
from tests.kernels.aot_util import compile_env, cuobjdump_available
from lctrain.kernels.linear_attention.triton_config import (
    SUPPORTED_KEY_DIMS,
    SUPPORTED_VALUE_DIMS,
    launch_config,
)

MODULE = "lctrain.kernels.linear_attention.triton_chunk"


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    if not cuobjdump_available():
        pytest.skip("the installed triton ships no cuobjdump (not a Linux x86-64 wheel)")
    env = compile_env(tmp_path_factory.mktemp("triton_cache"))
    done = subprocess.run([sys.executable, "-m", "lctrain.kernels.aot", "--modules", "kernels.linear_attention.triton_chunk",
                           "--archs", "80,90", "--dtypes", "bf16,fp32", "--jobs", "2"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.stdout, f"no report; stderr:\n{done.stderr[-4000:]}"
    parsed = json.loads(done.stdout)
    parsed["returncode"] = done.returncode
    return parsed


def test_every_kernel_config_compiles_fits_shared_memory_and_does_not_spill(report):
    problems = [
        {key: entry.get(key) for key in ("arch", "dtype", "label", "error", "shared", "registers", "local", "stack")}
        for entry in report["results"] if not entry["ok"]]
    assert not problems, json.dumps(problems, indent=1)
    assert report["ok"] and report["returncode"] == 0
    for entry in report["results"]:
        assert entry["compiled"]
        assert 0 <= entry["shared"] <= aot.SHARED_MEMORY_LIMIT[entry["arch"]]
        assert entry["local"] == 0 and entry["stack"] == 0
        assert 0 < entry["registers"] <= 255


def test_report_covers_every_launch_configuration_for_both_archs_and_dtypes(report):
    checked = {(entry["arch"], entry["dtype"], entry["kernel"], entry["label"]) for entry in report["results"]}
    assert {entry["arch"] for entry in report["results"]} == {80, 90}
    assert {entry["dtype"] for entry in report["results"]} == {"bf16", "fp32"}
    kernels = {"fwd": ["linear_attention_fwd_kernel"], "bwd_dq": ["linear_attention_bwd_dq_kernel"],
               "bwd_dkv": ["linear_attention_bwd_dkv_kernel"], "dlog_decay": ["linear_attention_dlog_decay_kernel"]}
    for arch in (80, 90):
        for dtype in ("bf16", "fp32"):
            for key_dim in SUPPORTED_KEY_DIMS:
                for value_dim in SUPPORTED_VALUE_DIMS:
                    for direction, names in kernels.items():
                        cfg = launch_config(key_dim, value_dim, dtype, direction)
                        for name in names:
                            wanted = f"BT={cfg.chunk},BK={cfg.block_k}"
                            assert any(a == arch and d == dtype and kernel == name and wanted in label
                                       and f"warps={cfg.num_warps}" in label
                                       and (direction == "dlog_decay" or f"BV={cfg.block_v}" in label)
                                       for a, d, kernel, label in checked), (arch, dtype, name, cfg)


def test_module_filter_and_interpreter_guard():
    assert aot.select_modules(["kernels.linear_attention."]) == [MODULE]
    assert aot.select_modules(None) == aot.AOT_MODULES
    with pytest.raises(ValueError, match="matches none"):
        aot.select_modules(["no_such_op"])
    # The test session runs under the interpreter, where kernels cannot be compiled: refuse clearly.
    assert os.environ.get("TRITON_INTERPRET") == "1"
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        aot.run_checks([MODULE])
