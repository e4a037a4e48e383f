"""Ahead-of-time compile check of the `landmark_attention` Triton kernels for sm_80 / sm_90 (no GPU needed):
compiles, shared memory fits, no register spills.

The checker cannot run under the interpreter this test session uses, so it runs in a subprocess with
TRITON_INTERPRET unset and a private kernel cache (every kernel is really compiled). The default run compiles
the largest configuration (128-wide heads, 64-token blocks: the most registers) of every kernel, bf16 for sm_90
and fp32 for sm_80; the sweep over every head width, block tile, arch and dtype is marked slow.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lctrain.kernels import aot
from tests.kernels.aot_util import assert_all_ok, compile_env, cuobjdump_available

MODULE = "lctrain.kernels.landmark_attention.triton_blocks"
KERNELS = {"landmark_fwd_kernel", "landmark_bwd_dq_kernel", "landmark_bwd_dkv_kernel"}
REPO_ROOT = Path(__file__).resolve().parents[2]

# Runs in a clean interpreter: compile the specs `aot_specs(dtype, head_dims, block_tiles)` lists, for the given
# (dtype, arch) pairs.
_SUBSET_CHECK = """
import json, sys
from lctrain.kernels import aot
from lctrain.kernels.landmark_attention.triton_blocks import aot_specs
module, head_dims, block_tiles, pairs = sys.argv[1], *map(json.loads, sys.argv[2:5])
results = []
for dtype, arch in pairs:
    wanted = {spec.label for spec in aot_specs(dtype, head_dims, block_tiles)}
    for index, spec in enumerate(aot._specs(module, dtype)):
        if spec.label in wanted:
            results.append(aot.check_one(module, dtype, index, arch))
print(json.dumps(results))
"""


def test_registered_with_the_checker_and_every_launched_kernel_is_listed():
    assert MODULE in aot.AOT_MODULES
    from lctrain.kernels.landmark_attention import triton_bwd, triton_fwd
    from lctrain.kernels.landmark_attention.triton_blocks import aot_specs
    from lctrain.kernels.landmark_attention.triton_config import (KERNELS as DIRECTIONS, MAX_BLOCK_SIZE,
                                                                  MAX_HEAD_DIM, launch_config)

    defined = {name for module in (triton_fwd, triton_bwd) for name in vars(module)
               if name.startswith("landmark_") and name.endswith("_kernel")}
    assert defined == KERNELS
    for dtype in aot.DEFAULT_DTYPES:
        specs = aot_specs(dtype)
        labels = [spec.label for spec in specs]
        assert len(labels) == len(set(labels))
        assert {spec.kernel.__name__ for spec in specs} == KERNELS
        # Every (head dim, block size) a launch accepts maps to a listed configuration of every kernel.
        for dim in (1, 5, 16, 17, 32, 48, 64, 100, MAX_HEAD_DIM):
            for block_size in range(2, MAX_BLOCK_SIZE + 1):
                for direction in DIRECTIONS:
                    cfg = launch_config(dim, dim, block_size, direction)
                    assert cfg.block_n >= block_size and cfg.block_n % cfg.block_m == 0
                    shape = (f"[BM={cfg.block_m},BN={cfg.block_n},BD={cfg.block_d},BDV={cfg.block_dv},"
                             f"warps={cfg.num_warps}]")
                    assert any(label.startswith(f"landmark_{direction}_kernel") and label.endswith(shape)
                               for label in labels), (dtype, dim, block_size, direction)
    with pytest.raises(ValueError, match="block_size"):
        launch_config(16, 16, MAX_BLOCK_SIZE + 1, "fwd")
    with pytest.raises(ValueError, match="head dim"):
        launch_config(MAX_HEAD_DIM + 1, 16, 8, "fwd")


def test_largest_configs_compile_without_spills(tmp_path):
    if not cuobjdump_available():
        pytest.skip("the installed triton ships no cuobjdump (not a Linux x86-64 wheel)")
    pairs = [["bf16", 90], ["fp32", 80]]
    proc = subprocess.run([sys.executable, "-c", _SUBSET_CHECK, MODULE, json.dumps([128]), json.dumps([64]),
                           json.dumps(pairs)],
                          capture_output=True, text=True, env=compile_env(tmp_path), timeout=600, cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {(r["dtype"], r["arch"]) for r in results} == {tuple(p) for p in pairs}
    assert len(results) == 2 * len(KERNELS)
    assert_all_ok(results, KERNELS, registers=True)


@pytest.mark.slow
def test_every_config_compiles_without_spills(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "lctrain.kernels.aot", "--modules", "landmark_attention"],
                          capture_output=True, text=True, env=compile_env(tmp_path), timeout=3600, cwd=REPO_ROOT)
    report = json.loads(proc.stdout)
    assert_all_ok(report["results"], KERNELS, registers=True)
    assert {r["arch"] for r in report["results"]} == set(aot.DEFAULT_ARCHS)
    assert {r["dtype"] for r in report["results"]} == set(aot.DEFAULT_DTYPES)
    assert report["ok"] and proc.returncode == 0
