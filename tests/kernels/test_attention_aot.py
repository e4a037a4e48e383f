"""Ahead-of-time compile check of the `attention` Triton kernels for sm_80 and sm_90 in bf16 and fp32 (no GPU
needed): compiles, shared memory fits, no register spills, for exactly the configurations the launcher uses
(`triton_config.launch_config`, read by both). The checker runs in a subprocess without TRITON_INTERPRET and with
a private cache. Compiling takes minutes on a small CPU, so both compile tests are marked slow: the widest heads
(128: the most registers) and the full sweep; the default run checks that the compile list is the launch table."""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from lctrain.kernels import aot
from tests.kernels.aot_util import assert_all_ok, compile_env, cuobjdump_available

MODULE = "lctrain.kernels.attention.triton_attention"
KERNELS = {"attention_fwd_kernel", "attention_bwd_dq_kernel", "attention_bwd_dkv_kernel"}
REPO_ROOT = Path(__file__).resolve().parents[2]

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


def _compile(kwargs: dict) -> list[dict]:
    if not cuobjdump_available():
        pytest.skip("the installed triton ships no cuobjdump (not a Linux x86-64 wheel)")
    with tempfile.TemporaryDirectory() as cache_dir:
        proc = subprocess.run([sys.executable, "-c", _SUBSET_CHECK, MODULE, json.dumps(kwargs)], cwd=REPO_ROOT,
                              capture_output=True, text=True, env=compile_env(cache_dir), timeout=1800)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_registered_and_the_launch_table_is_the_compile_list():
    assert MODULE in aot.AOT_MODULES
    from lctrain.kernels.attention import triton_attention
    from lctrain.kernels.attention.triton_config import launch_config
    for dtype in aot.DEFAULT_DTYPES:
        labels = [spec.label for spec in triton_attention.aot_specs(dtype)]
        assert len(labels) == len(set(labels)) == 12          # 3 kernels x 4 head widths
        for dim in (1, 16, 40, 64, 100, 128):                 # every width a launch can pick is listed
            for kernel in ("fwd", "bwd_dq", "bwd_dkv"):
                cfg = launch_config(dim, dim, kernel, dtype)
                assert any(f"BM={cfg.block_m},BN={cfg.block_n},BD={cfg.block_d},warps={cfg.num_warps}]" in label
                           for label in labels), (dim, kernel, dtype)


@pytest.mark.slow
def test_widest_attention_kernels_compile_without_spills():
    results = _compile({"head_dims": [[128, 128]]})
    assert len(results) == 3 * len(aot.DEFAULT_DTYPES) * len(aot.DEFAULT_ARCHS)
    assert_all_ok(results, KERNELS)


@pytest.mark.slow
def test_every_attention_config_compiles_without_spills():
    results = _compile({})
    assert len(results) == 12 * len(aot.DEFAULT_DTYPES) * len(aot.DEFAULT_ARCHS)
    assert_all_ok(results, KERNELS)
