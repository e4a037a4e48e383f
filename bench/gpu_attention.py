"""Attention section of the GPU check: the `attention` op's Triton kernels against flash-attn (when importable),
SDPA (causal, single-document rows only: it cannot mask packed documents without a dense mask) and FlexAttention
(document-causal block mask), forward + backward.

Full size (CUDA): T = 8K and 32K tokens per row, H = 16, D = 128, bf16, single-document rows and rows of 8 packed
documents; TFLOP/s (causal FLOPs counted per document: 4 * sum(L^2 / 2) * H * D forward, 2.5x that backward) and
peak memory per case; each method's output is compared with a reference on the same inputs (SDPA on single
documents, FlexAttention on packed ones). `smoke=True` runs the same cases at tiny size (on the CPU when no GPU is
present, the op through its torch path) so the section is exercised in the test suite.

    from bench.gpu_attention import run; run(out_dir, smoke=False)     # called by bench/gpu_check.py
    python bench/gpu_attention.py [--smoke] [--out DIR]
Writes `<out_dir>/gpu_attention.json` after every case.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lctrain.kernels.attention import attention  # noqa: E402

FULL = {"lengths": (8192, 32768), "heads": 16, "head_dim": 128, "dtype": torch.bfloat16, "docs": 8}
SMOKE = {"lengths": (128,), "heads": 2, "head_dim": 16, "dtype": torch.float32, "docs": 4}


def _flops(doc_lengths: list[int], heads: int, dim: int) -> float:
    forward = 4 * sum(n * n / 2 for n in doc_lengths) * heads * dim
    return forward * 3.5                                                  # forward + backward (2.5x)


def _time_ms(fn, device: str, smoke: bool) -> float:
    if device == "cuda":
        import triton
        return triton.testing.do_bench(fn, warmup=5 if smoke else 25, rep=20 if smoke else 100)
    fn()
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def _methods(device: str, packed: bool, cu: torch.Tensor, cu_cpu: torch.Tensor, length: int, smoke: bool):
    """name -> callable(q, k, v) -> o `[1, T, H, D]`, or a string saying why it does not apply."""
    methods = {}
    op_backend = "triton" if device == "cuda" else "torch"
    kwargs = dict(cu_seqlens=cu, cu_seqlens_cpu=cu_cpu) if packed else {}
    methods[f"lctrain ({op_backend})"] = lambda q, k, v: attention(q, k, v, backend=op_backend, **kwargs)
    try:
        from flash_attn import flash_attn_varlen_func
        if device != "cuda":
            raise ImportError("flash-attn needs CUDA")
        max_len = int((cu_cpu[1:] - cu_cpu[:-1]).max())
        methods["flash-attn"] = lambda q, k, v: flash_attn_varlen_func(
            q[0], k[0], v[0], cu, cu, max_len, max_len, causal=True)[None]
    except Exception as error:  # noqa: BLE001 - reported, not fatal
        methods["flash-attn"] = f"not available: {type(error).__name__}: {error}"[:200]
    if packed:
        methods["sdpa causal"] = "not applicable: SDPA masks packed documents only with a dense [T, T] mask"
    else:
        methods["sdpa causal"] = lambda q, k, v: F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True).transpose(1, 2)
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        docs = torch.searchsorted(cu[1:].long(), torch.arange(length, device=cu.device), right=True)

        def document_causal(b, h, q_idx, kv_idx):
            return (kv_idx <= q_idx) & (docs[q_idx] == docs[kv_idx])
        mask = create_block_mask(document_causal, None, None, length, length, device=device)
        compiled = not smoke and device == "cuda"
        flex = torch.compile(flex_attention) if compiled else flex_attention

        def flex_method(q, k, v):
            with warnings.catch_warnings():   # uncompiled at smoke size on purpose
                if not compiled:
                    warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
                return flex(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=mask).transpose(1, 2)
        methods["flex attention"] = flex_method
    except Exception as error:  # noqa: BLE001
        methods["flex attention"] = f"not available: {type(error).__name__}: {error}"[:200]
    return methods


def run(out_dir, smoke: bool = False) -> dict:
    """Time every method on every case; write `<out_dir>/gpu_attention.json` after each; return the report."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = SMOKE if smoke or device != "cuda" else FULL
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "smoke": smoke,
              "torch": torch.__version__, "heads": cfg["heads"], "head_dim": cfg["head_dim"],
              "dtype": str(cfg["dtype"]).replace("torch.", ""), "cases": []}
    for length in cfg["lengths"]:
        for packed in (False, True):
            doc_lengths = [length // cfg["docs"]] * cfg["docs"] if packed else [length]
            doc_lengths[-1] += length - sum(doc_lengths)
            cu_cpu = torch.tensor([0] + torch.tensor(doc_lengths).cumsum(0).tolist(), dtype=torch.int32)
            cu = cu_cpu.to(device)
            torch.manual_seed(0)
            q, k, v = (torch.randn(1, length, cfg["heads"], cfg["head_dim"], device=device, dtype=cfg["dtype"])
                       for _ in range(3))
            grad = torch.randn_like(q)
            reference = None
            for name, fn in _methods(device, packed, cu, cu_cpu, length, smoke).items():
                case = {"T": length, "layout": "packed" if packed else "single", "method": name}
                if isinstance(fn, str):
                    case["skipped"] = fn
                else:
                    try:
                        with torch.no_grad():
                            o = fn(q, k, v).float()
                        if reference is None and name in ("sdpa causal", "flex attention"):
                            reference = o
                        case["_out"] = o
                        case.update(_measure(fn, q, k, v, grad, device, smoke,
                                             _flops(doc_lengths, cfg["heads"], cfg["head_dim"])))
                    except Exception as error:  # noqa: BLE001 - one failing method must not stop the section
                        case["error"] = f"{type(error).__name__}: {error}"[:300]
                report["cases"].append(case)
            for case in report["cases"]:
                o = case.pop("_out", None)
                if o is not None and reference is not None:
                    case["max_abs_err_vs_reference"] = float((o - reference).abs().max())
            (out / "gpu_attention.json").write_text(json.dumps(report, indent=1))
    return report


def _measure(fn, q, k, v, grad, device, smoke, flops) -> dict:
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]

    def step():
        for x in leaves:
            x.grad = None
        fn(*leaves).backward(grad)
    try:
        step()
    except NotImplementedError as error:      # e.g. FlexAttention's backward on the CPU: time the forward alone
        with torch.no_grad():
            ms = _time_ms(lambda: fn(q, k, v), device, smoke)
        return {"ms_forward_only": ms, "note": f"forward only ({error})"[:200]}
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    ms = _time_ms(step, device, smoke)
    result = {"ms": ms, "tflops": flops / (ms * 1e-3) / 1e12}
    if device == "cuda":
        result["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args(argv)
    report = run(args.out, smoke=args.smoke)
    print(f"{'T':>6} {'layout':7} {'method':18} {'ms':>9} {'TFLOP/s':>8} {'err':>9}  note")
    for c in report["cases"]:
        note = c.get("skipped") or c.get("error") or c.get("note") or ""
        print(f"{c['T']:>6} {c['layout']:7} {c['method']:18} {c.get('ms', float('nan')):>9.2f} "
              f"{c.get('tflops', float('nan')):>8.3f} {c.get('max_abs_err_vs_reference', float('nan')):>9.2e}  "
              f"{note[:60]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
