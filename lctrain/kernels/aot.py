"""Ahead-of-time compile check for every Triton kernel in `lctrain.kernels`, runnable on a machine without a GPU.

For each registered launch configuration, each target (sm_80, sm_90) and each element type (bf16, fp32) it
runs the real Triton compiler (`triton.compile` with a `GPUTarget`, the bundled ptxas), then asserts that
  * it compiles,
  * its shared memory (`compiled.metadata.shared`) fits the target's per-block limit,
  * `cuobjdump --dump-resource-usage` on the cubin reports LOCAL:0 and STACK:0 (register spills land in the
    stack frame, so a non-zero STACK is a spill too).

Registration API
----------------
A Triton module takes part by (1) defining

    def aot_specs(dtype: str) -> list[AotSpec]

returning one `AotSpec` per launch configuration its op can use for q/k/v element type `dtype` ("bf16" or
"fp32"): the `@triton.jit` kernel, its full signature `{arg: triton type}` (constexpr args typed
"constexpr"), the constexpr values, num_warps, num_stages, a unique label and, optionally, `attrs` such as
`divisibility_attrs(kernel, signature)`; and (2) appending its dotted module name to `AOT_MODULES` below.
Block sizes should be a pure function of the head dims (no autotune), so the list equals the launch list.

Command line (must run with TRITON_INTERPRET unset: the interpreter replaces `@triton.jit` functions with
objects that cannot be compiled)::

    python -m lctrain.kernels.aot [--modules SUBSTR,...] [--archs 80,90] [--dtypes bf16,fp32] [--jobs 2]

prints a JSON report `{"ok": bool, "results": [...], "failures": [...]}` on stdout and exits 1 on any failure.
`--modules` keeps the registered modules whose name contains one of the substrings.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import import_module
from typing import Any

AOT_MODULES: list[str] = [
    "lctrain.kernels.linear_attention.triton_chunk",
    "lctrain.kernels.gated_delta_rule.triton_chunk",
    "lctrain.kernels.local_attention.triton_local",
    "lctrain.kernels.taylor_linear_attention.triton_chunk",
    "lctrain.kernels.titans_memory.triton_chunk",
    "lctrain.kernels.landmark_attention.triton_blocks",
    "lctrain.kernels.attention.triton_attention",
]

# Largest dynamic shared memory one block may use (opt-in limit), in bytes.
SHARED_MEMORY_LIMIT = {80: 166912, 90: 232448}
DEFAULT_ARCHS = (80, 90)
DEFAULT_DTYPES = ("bf16", "fp32")
WARP_SIZE = 32


@dataclass(frozen=True)
class AotSpec:
    """One launch configuration of one kernel.

    kernel: the `@triton.jit` function. signature: `{arg name: type}` for every argument in order, types like
    "*bf16", "*fp32", "*i32", "i32", "fp32", or "constexpr". constexprs: `{arg name: value}`.
    label: unique within its module and dtype. attrs: compiler hints keyed by `(arg index,)`.
    """

    kernel: Any
    signature: dict[str, str]
    constexprs: dict[str, Any]
    num_warps: int
    num_stages: int
    label: str
    attrs: dict = field(default_factory=dict)


def divisibility_attrs(kernel: Any, signature: dict[str, str], ints: tuple[str, ...] = ()) -> dict:
    """Mark every pointer argument (and the integer arguments named in `ints`) as divisible by 16, which is
    how Triton specialises a launch on 16-byte-aligned tensors; the AOT build then matches the real one."""
    names = kernel.arg_names
    hint = [["tt.divisibility", 16]]
    return {(names.index(name),): hint for name, kind in signature.items()
            if kind.startswith("*") or name in ints}


def pointer_attrs(kernel: Any, signature: dict[str, str]) -> dict:
    """`divisibility_attrs` for the pointer arguments only."""
    return divisibility_attrs(kernel, signature)


@lru_cache(maxsize=None)
def _specs(module: str, dtype: str) -> list[AotSpec]:
    specs = import_module(module).aot_specs(dtype)
    labels = [spec.label for spec in specs]
    if len(set(labels)) != len(labels):
        raise ValueError(f"aot: {module}.aot_specs({dtype!r}) returned duplicate labels")
    return specs


def _tool(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def resource_usage(cubin: bytes) -> dict[str, int]:
    """REG, STACK, SHARED and LOCAL of the (single) function in a cubin, read with `cuobjdump`."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as handle:
        handle.write(cubin)
        handle.flush()
        text = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", handle.name],
                              check=True, capture_output=True, text=True).stdout
    line = next((ln for ln in text.splitlines() if "REG:" in ln), None)
    if line is None:
        raise RuntimeError(f"aot: no resource usage line in cuobjdump output:\n{text}")
    return {key: int(re.search(rf"\b{key}:(\d+)", line).group(1)) for key in ("REG", "STACK", "SHARED", "LOCAL")}


def check_one(module: str, dtype: str, index: int, arch: int) -> dict[str, Any]:
    """Compile spec `index` of `module` for `dtype` and sm_`arch`; return one report entry."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile as triton_compile

    spec = _specs(module, dtype)[index]
    entry: dict[str, Any] = {"module": module, "dtype": dtype, "arch": arch, "label": spec.label,
                             "kernel": spec.kernel.__name__, "num_warps": spec.num_warps,
                             "num_stages": spec.num_stages, "shared_limit": SHARED_MEMORY_LIMIT[arch]}
    start = time.perf_counter()
    try:
        source = ASTSource(fn=spec.kernel, signature=spec.signature, constexprs=spec.constexprs, attrs=spec.attrs)
        compiled = triton_compile(source, target=GPUTarget("cuda", arch, WARP_SIZE),
                                  options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})
        usage = resource_usage(compiled.asm["cubin"])
    except Exception as error:  # report every failure instead of stopping at the first
        entry.update(compiled=False, ok=False, error=f"{type(error).__name__}: {error}"[:2000])
        return entry
    entry.update(compiled=True, shared=int(compiled.metadata.shared), registers=usage["REG"],
                 local=usage["LOCAL"], stack=usage["STACK"], seconds=round(time.perf_counter() - start, 2))
    entry["shared_fits"] = entry["shared"] <= SHARED_MEMORY_LIMIT[arch]
    entry["no_spill"] = usage["LOCAL"] == 0 and usage["STACK"] == 0
    entry["ok"] = entry["shared_fits"] and entry["no_spill"]
    return entry


def _check_task(task: tuple[str, str, int, int]) -> dict[str, Any]:
    return check_one(*task)


def select_modules(filters: list[str] | None) -> list[str]:
    """Registered modules whose dotted name contains one of `filters` (all of them when None/empty)."""
    if not filters:
        return list(AOT_MODULES)
    chosen = [m for m in AOT_MODULES if any(f in m for f in filters)]
    if not chosen:
        raise ValueError(f"aot: --modules {filters} matches none of the registered modules {AOT_MODULES}")
    return chosen


def run_checks(modules: list[str], archs: tuple[int, ...] = DEFAULT_ARCHS,
               dtypes: tuple[str, ...] = DEFAULT_DTYPES, jobs: int = 2) -> dict[str, Any]:
    """Compile every spec of `modules` for every arch and dtype (in `jobs` processes); return the report."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("aot: TRITON_INTERPRET=1 is set; interpreted kernels cannot be compiled. "
                           "Run `python -m lctrain.kernels.aot` with TRITON_INTERPRET unset.")
    for arch in archs:
        if arch not in SHARED_MEMORY_LIMIT:
            raise ValueError(f"aot: arch={arch} is not one of {sorted(SHARED_MEMORY_LIMIT)}")
    tasks = [(module, dtype, index, arch) for module in modules for dtype in dtypes
             for index in range(len(_specs(module, dtype))) for arch in archs]
    start = time.perf_counter()
    if jobs <= 1:
        results = [_check_task(task) for task in tasks]
    else:
        with ProcessPoolExecutor(max_workers=jobs) as pool:
            results = list(pool.map(_check_task, tasks))
    failures = [r for r in results if not r["ok"]]
    return {"ok": not failures and bool(results), "modules": modules, "archs": list(archs),
            "dtypes": list(dtypes), "count": len(results), "seconds": round(time.perf_counter() - start, 1),
            "results": results, "failures": failures}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lctrain.kernels.aot", description=__doc__.split("\n")[0])
    parser.add_argument("--modules", default="", help="comma-separated substrings of registered module names")
    parser.add_argument("--archs", default=",".join(map(str, DEFAULT_ARCHS)), help="e.g. 80,90")
    parser.add_argument("--dtypes", default=",".join(DEFAULT_DTYPES), help="e.g. bf16,fp32")
    parser.add_argument("--jobs", type=int, default=2, help="compile processes")
    args = parser.parse_args(argv)
    modules = select_modules([m for m in args.modules.split(",") if m])
    archs = tuple(int(a) for a in args.archs.split(",") if a)
    dtypes = tuple(d for d in args.dtypes.split(",") if d)
    report = run_checks(modules, archs, dtypes, args.jobs)
    json.dump(report, sys.stdout, indent=1)
    sys.stdout.write("\n")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
