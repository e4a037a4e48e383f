"""Ahead-of-time compile check of the `local_attention` and `taylor_linear_attention` Triton kernels for sm_80
and sm_90 in bf16 and fp32 (no GPU needed): compiles, shared memory fits, no register spills.

The checker cannot run under the interpreter this test session uses, so it runs in a subprocess with
TRITON_INTERPRET unset and a private kernel cache (every kernel is really compiled). The default run compiles
the widest Taylor configuration (feature block 32: the most registers); the sweeps over both Taylor feature blocks
and every local-attention head width are marked slow.
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from lctrain.kernels import aot
from tests.kernels.aot_util import assert_all_ok, compile_env, cuobjdump_available

LOCAL = "lctrain.kernels.local_attention.triton_local"
TAYLOR = "lctrain.kernels.taylor_linear_attention.triton_chunk"
REPO_ROOT = Path(__file__).resolve().parents[2]

# Runs in a clean interpreter: compile the specs of argv[1] whose labels `aot_specs(dtype, **kwargs)` lists.
_SUBSET_CHECK = """
import importlib, json, sys
from lctrain.kernels import aot
module, kwargs = sys.argv[1], json.loads(sys.argv[2])
results = []
for dtype in aot.DEFAULT_DTYPES:
    wanted = {spec.label for spec in importlib.import_module(module).aot_specs(dtype, **kwargs)}
    for index, spec in enumerate(aot._specs(module, dtype)):
        if spec.label in wanted:
            results.extend(aot.check_one(module, dtype, index, arch) for arch in aot.DEFAULT_ARCHS)
print(json.dumps(results))
"""


def _compile(module: str, kwargs: dict) -> list[dict]:
    if not cuobjdump_available():
        pytest.skip("the installed triton ships no cuobjdump (not a Linux x86-64 wheel)")
    with tempfile.TemporaryDirectory() as cache_dir:
        proc = subprocess.run([sys.executable, "-c", _SUBSET_CHECK, module, json.dumps(kwargs)], cwd=REPO_ROOT,
                              capture_output=True, text=True, env=compile_env(cache_dir), timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _assert_all_ok(results: list[dict], kernels: set[str]) -> None:
    assert_all_ok(results, kernels)
    assert {r["arch"] for r in results} == set(aot.DEFAULT_ARCHS)
    assert {r["dtype"] for r in results} == set(aot.DEFAULT_DTYPES)


def test_registered_with_the_checker_and_every_launched_kernel_is_listed():
    assert LOCAL in aot.AOT_MODULES and TAYLOR in aot.AOT_MODULES
    from lctrain.kernels.local_attention import triton_local
    from lctrain.kernels.local_attention.triton_config import launch_config as local_config
    from lctrain.kernels.taylor_linear_attention import triton_chunk
    from lctrain.kernels.taylor_linear_attention.triton_chunk import launch_config as taylor_config

    for dtype in aot.DEFAULT_DTYPES:
        local_labels = [spec.label for spec in triton_local.aot_specs(dtype)]
        assert len(local_labels) == len(set(local_labels)) == 12  # 3 kernels x 4 head widths
        for dim in (1, 16, 40, 64, 100, 128):  # every width a launch can pick is listed
            for kernel in ("fwd", "bwd_dq", "bwd_dkv"):
                cfg = local_config(dim, dim, kernel)
                assert any(f"BD={cfg.block_d}," in label and f"BM={cfg.block_m},BN={cfg.block_n}" in label
                           and f"warps={cfg.num_warps}" in label for label in local_labels), (dim, kernel)
        taylor_labels = [spec.label for spec in triton_chunk.aot_specs(dtype)]
        for dim in (1, 7, 16, 17, 24, 32):
            for kernel in ("fwd", "bwd_dq", "bwd_dkv"):
                cfg = taylor_config(dim, kernel)
                assert any(f"BT={cfg.chunk},BD={cfg.block_d},BV={cfg.block_v},warps={cfg.num_warps}" in label
                           for label in taylor_labels), (dim, kernel)


def test_widest_taylor_kernels_compile_without_spills():
    results = _compile(TAYLOR, {"feature_blocks": [32]})
    # 3 kernels at the wider feature block (17 <= D <= 32: the most registers), bf16/fp32 on sm_80/sm_90.
    assert len(results) == 3 * len(aot.DEFAULT_DTYPES) * len(aot.DEFAULT_ARCHS)
    assert all("BD=32," in r["label"] for r in results)
    _assert_all_ok(results, {"taylor_fwd_kernel", "taylor_bwd_dq_kernel", "taylor_bwd_dkv_kernel"})


@pytest.mark.slow  # ~17 s with both feature blocks
def test_every_taylor_config_compiles_without_spills():
    results = _compile(TAYLOR, {})
    # 3 kernels x both feature blocks (D <= 16 and 17 <= D <= 32), each for bf16/fp32 on sm_80/sm_90.
    assert len(results) == 3 * 2 * len(aot.DEFAULT_DTYPES) * len(aot.DEFAULT_ARCHS)
    assert {block for block in (16, 32) if any(f"BD={block}," in r["label"] for r in results)} == {16, 32}
    _assert_all_ok(results, {"taylor_fwd_kernel", "taylor_bwd_dq_kernel", "taylor_bwd_dkv_kernel"})


@pytest.mark.slow  # ~14 s; every local config is in the slow sweep
def test_widest_local_attention_kernels_compile_without_spills():
    results = _compile(LOCAL, {"head_dims": [[128, 128]]})
    _assert_all_ok(results, {"local_attention_fwd_kernel", "local_attention_bwd_dq_kernel",
                             "local_attention_bwd_dkv_kernel"})


@pytest.mark.slow
def test_every_local_attention_config_compiles_without_spills():
    results = _compile(LOCAL, {})
    assert len(results) == 12 * len(aot.DEFAULT_DTYPES) * len(aot.DEFAULT_ARCHS)
    _assert_all_ok(results, {"local_attention_fwd_kernel", "local_attention_bwd_dq_kernel",
                             "local_attention_bwd_dkv_kernel"})
