"""Helpers of the ahead-of-time compile tests: the checker runs in a subprocess without TRITON_INTERPRET and with a
private kernel cache (so it really compiles), and every result must be spill-free and fit shared memory."""
import json
import os

from lctrain.kernels import aot


def compile_env(cache_dir) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(cache_dir)  # a private cache: the check must really compile
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    return env


def cuobjdump_available() -> bool:
    try:
        return os.access(aot._tool("cuobjdump"), os.X_OK)
    except ImportError:
        return False


def assert_all_ok(results: list[dict], kernels: set[str] | None = None, registers: bool = False) -> None:
    """Every checked configuration compiled with no LOCAL/STACK spill bytes and fits shared memory; with
    `registers`, also uses shared memory and at most 255 registers; with `kernels`, covers exactly those."""
    assert results, "no launch configuration was checked"
    failures = [r for r in results if not r["ok"]]
    assert not failures, json.dumps(failures, indent=1)
    for r in results:
        assert r["compiled"] and r["local"] == 0 and r["stack"] == 0
        assert 0 <= r["shared"] <= aot.SHARED_MEMORY_LIMIT[r["arch"]]
        if registers:
            assert r["shared"] > 0 and 0 < r["registers"] <= 255
    if kernels is not None:
        assert {r["kernel"] for r in results} == kernels
