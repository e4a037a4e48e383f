"""Ahead-of-time compile check of the titans_linear_memory Triton kernels for sm_80 / sm_90 (no GPU needed).

The checker must run without TRITON_INTERPRET (which this test process sets), so it runs in a subprocess with
a private kernel cache. The default suite compiles the largest launch configuration (K = V = 128, 32-token
chunks) of every kernel, bf16 for sm_90 and fp32 for sm_80; the full sweep over every supported head dim,
chunk tile, arch and dtype is marked slow.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from lctrain.kernels import aot
from tests.kernels.aot_util import assert_all_ok, compile_env, cuobjdump_available

MODULE = "lctrain.kernels.titans_memory.triton_chunk"
REPO_ROOT = Path(__file__).resolve().parents[2]

# Runs in a clean interpreter: compile the specs of (head dims, chunk sizes) for the given (dtype, arch) pairs.
_SUBSET_CHECK = """
import json, sys
from lctrain.kernels import aot
from lctrain.kernels.titans_memory.triton_chunk import aot_specs
head_dims = [tuple(d) for d in json.loads(sys.argv[1])]
chunks = json.loads(sys.argv[2])
results = []
for dtype, arch in json.loads(sys.argv[3]):
    wanted = {spec.label for spec in aot_specs(dtype, head_dims, chunks)}
    for index, spec in enumerate(aot._specs(sys.argv[4], dtype)):
        if spec.label in wanted:
            results.append(aot.check_one(sys.argv[4], dtype, index, arch))
print(json.dumps(results))
"""


def test_registered_with_the_checker():
    assert MODULE in aot.AOT_MODULES
    from lctrain.kernels.titans_memory import triton_bwd, triton_fwd
    from lctrain.kernels.titans_memory.triton_chunk import aot_specs
    from lctrain.kernels.titans_memory.triton_config import (CHUNK_TILES, MAX_CHUNK, SUPPORTED_KEY_DIMS,
                                                             SUPPORTED_VALUE_DIMS, launch_config)

    defined = {name for module in (triton_fwd, triton_bwd) for name in vars(module)
               if name.startswith("titans_") and name.endswith("_kernel")}
    for dtype in aot.DEFAULT_DTYPES:
        specs = aot_specs(dtype)
        labels = [spec.label for spec in specs]
        assert len(labels) == len(set(labels))
        assert {spec.kernel.__name__ for spec in specs} == defined  # every launched kernel is checked
        # Every chunk_size a launch accepts maps to a listed tile, for every supported head dim.
        for chunk_size in range(1, MAX_CHUNK + 1):
            for key_dim in SUPPORTED_KEY_DIMS:
                for value_dim in SUPPORTED_VALUE_DIMS:
                    cfg = launch_config(key_dim, value_dim, chunk_size, dtype)
                    assert cfg.chunk_tile in CHUNK_TILES and cfg.chunk_tile >= chunk_size
                    shape = f"BT={cfg.chunk_tile},BK={cfg.key_block},BV={cfg.value_block},{cfg.precision}"
                    assert any(shape in label for label in labels), (dtype, key_dim, value_dim, chunk_size)


def test_largest_configs_compile_without_spills(tmp_path):
    if not cuobjdump_available():
        pytest.skip("the installed triton ships no cuobjdump (not a Linux x86-64 wheel)")
    pairs = [["bf16", 90], ["fp32", 80]]
    proc = subprocess.run([sys.executable, "-c", _SUBSET_CHECK, json.dumps([[128, 128]]), json.dumps([32]),
                           json.dumps(pairs), MODULE],
                          capture_output=True, text=True, env=compile_env(tmp_path), timeout=600, cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {(r["dtype"], r["arch"]) for r in results} == {tuple(p) for p in pairs}
    assert len(results) == 2 * 5  # five kernels each
    assert_all_ok(results, registers=True)


@pytest.mark.slow
def test_every_config_compiles_without_spills(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "lctrain.kernels.aot", "--modules", "titans_memory"],
                          capture_output=True, text=True, env=compile_env(tmp_path), timeout=3600, cwd=REPO_ROOT)
    report = json.loads(proc.stdout)
    assert_all_ok(report["results"], registers=True)
    assert {r["arch"] for r in report["results"]} == set(aot.DEFAULT_ARCHS)
    assert {r["dtype"] for r in report["results"]} == set(aot.DEFAULT_DTYPES)
    assert report["ok"] and proc.returncode == 0
