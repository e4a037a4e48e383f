"""Ahead-of-time compile check of the gated_delta_rule Triton kernels for sm_80 / sm_90 (no GPU needed).

The checker must run without TRITON_INTERPRET (which this test process sets), so it runs in a subprocess.
The default suite compiles the largest launch configuration (K=128, V=256) and a mid-sized one; the full
sweep over every supported head dim is marked slow.
"""
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from lctrain.kernels import aot
from tests.kernels.aot_util import assert_all_ok, compile_env

MODULE = "lctrain.kernels.gated_delta_rule.triton_chunk"
REPO_ROOT = Path(__file__).resolve().parents[2]

# Runs in a clean interpreter: compile the specs of `head_dims` for every arch and the given dtypes, print the report.
_SUBSET_CHECK = """
import json, sys
from lctrain.kernels import aot
from lctrain.kernels.gated_delta_rule.triton_chunk import aot_specs
head_dims = [tuple(d) for d in json.loads(sys.argv[1])]
results = []
for dtype in json.loads(sys.argv[3]):
    wanted = {spec.label for spec in aot_specs(dtype, head_dims)}
    for index, spec in enumerate(aot._specs(sys.argv[2], dtype)):
        if spec.label in wanted:
            results.extend(aot.check_one(sys.argv[2], dtype, index, arch) for arch in aot.DEFAULT_ARCHS)
print(json.dumps(results))
"""


# Runs in a clean interpreter: every kernel's Triton IR at the (K=128, V=256) launch configuration for sm_90,
# reduced to the operand and result element types of each tt.dot.
_DOT_TYPES = """
import json, re, sys
from triton._C.libtriton import ir
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from lctrain.kernels.gated_delta_rule.triton_chunk import aot_specs
target = GPUTarget("cuda", 90, 32)
backend = make_backend(target)
dots = {}
for spec in aot_specs(sys.argv[1], [(128, 256)]):
    source = ASTSource(fn=spec.kernel, signature=spec.signature, constexprs=spec.constexprs, attrs=spec.attrs)
    options = backend.parse_options({"num_warps": spec.num_warps, "num_stages": spec.num_stages})
    context = ir.context()
    ir.load_dialects(context)
    backend.load_dialects(context)
    module = source.make_ir(target, options, backend.get_codegen_implementation(options), backend.get_module_map(),
                            context)
    pattern = r"tt\.dot .*: tensor<[0-9x]+x(\w+)> \* tensor<[0-9x]+x(\w+)> -> tensor<[0-9x]+x(\w+)>"
    dots[spec.kernel.__name__] = [list(m.groups()) for m in re.finditer(pattern, str(module))]
print(json.dumps(dots))
"""


@pytest.mark.parametrize("dtype,operand", [("bf16", "bf16"), ("fp32", "f32")])
def test_products_take_operands_of_the_input_type(dtype, operand):
    """bf16 inputs: every matrix product of every kernel multiplies bf16 tiles into fp32 (tensor-core bf16, no
    TF32 on upcast tiles); fp32 inputs keep fp32 operands."""
    from lctrain.kernels.gated_delta_rule import triton_bwd, triton_fwd

    with tempfile.TemporaryDirectory() as cache_dir:
        proc = subprocess.run([sys.executable, "-c", _DOT_TYPES, dtype], capture_output=True, text=True,
                              env=compile_env(cache_dir), timeout=600, cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    dots = json.loads(proc.stdout.strip().splitlines()[-1])
    defined = {name for module in (triton_fwd, triton_bwd) for name in vars(module)
               if name.startswith("gdn_") and name.endswith("_kernel")}
    assert set(dots) == defined
    for kernel, types in dots.items():
        assert len(types) >= 2, kernel  # every kernel multiplies at least two tile pairs
        assert all(t == [operand, operand, "f32"] for t in types), (kernel, types)


def test_registered_with_the_checker():
    assert MODULE in aot.AOT_MODULES
    from lctrain.kernels.gated_delta_rule import triton_bwd, triton_fwd
    from lctrain.kernels.gated_delta_rule.triton_chunk import aot_specs

    for dtype in aot.DEFAULT_DTYPES:
        labels = [spec.label for spec in aot_specs(dtype)]
        assert len(labels) == len(set(labels))
        listed = {spec.kernel.__name__ for spec in aot_specs(dtype)}
        defined = {name for module in (triton_fwd, triton_bwd) for name in vars(module)
                   if name.startswith("gdn_") and name.endswith("_kernel")}
        assert listed == defined  # every kernel the autograd Function launches is checked


def _check_largest(dtypes):
    with tempfile.TemporaryDirectory() as cache_dir:
        proc = subprocess.run([sys.executable, "-c", _SUBSET_CHECK, json.dumps([[128, 256]]), MODULE, json.dumps(dtypes)],
                              capture_output=True, text=True, env=compile_env(cache_dir), timeout=600, cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {r["arch"] for r in results} == set(aot.DEFAULT_ARCHS)
    assert {r["dtype"] for r in results} == set(dtypes)
    assert_all_ok(results)


def test_largest_configs_compile_without_spills():
    """The recipes' head dims (K=128, V=256) in bf16, the GPU training dtype, on every arch."""
    _check_largest(["bf16"])


@pytest.mark.slow  # the fp32 variant of the same check (~14 s); every config with the sweep below
def test_largest_configs_compile_without_spills_fp32():
    _check_largest(["fp32"])


@pytest.mark.slow
def test_every_config_compiles_without_spills():
    with tempfile.TemporaryDirectory() as cache_dir:
        proc = subprocess.run([sys.executable, "-m", "lctrain.kernels.aot", "--modules", "gated_delta_rule"],
                              capture_output=True, text=True, env=compile_env(cache_dir), timeout=3600, cwd=REPO_ROOT)
    report = json.loads(proc.stdout)
    assert_all_ok(report["results"])
    assert report["ok"] and proc.returncode == 0
