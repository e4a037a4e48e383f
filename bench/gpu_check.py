"""One-call GPU check: environment, correctness, kernel speed against fla, attention backends and training
throughput, in about 8 minutes on one H100 whose Python has only torch and triton.

Optional wheels (fla-core for the fla comparisons, einops which it needs), fetched on a machine with internet and
copied beside the repository (about 1 MiB together):

    pip download --no-deps --only-binary=:all: --dest wheels fla-core==0.6.0 einops==0.8.2
    # the peers section needs transformers (>= 5.17, with Qwen3-Next); where the GPU image lacks it, carry it with
    # what it imports (about 48 MiB; add --python-version/--platform for the GPU machine's Python):
    pip download --only-binary=:all: --dest wheels transformers==5.25.0

On the GPU machine (no internet):

    pip install --no-index --no-deps --find-links wheels fla-core einops   # optional: fla sections skip without
    pip install --no-index --find-links wheels transformers                # only where it is missing
    python bench/gpu_check.py                 # JSON per section into $OUT (or --out DIR), summary table on stdout
    python bench/gpu_check.py --sections kernels,training
    python bench/gpu_check.py --smoke         # every section at tiny sizes on the CPU (the default test suite runs it)

Sections, each with its own deadline; the risky ones run in a subprocess (a crash, hang or out-of-memory costs
that section only) and write their JSON file after every case, so a timeout keeps what was measured:
  environment  GPU, driver, torch / triton / CUDA versions, which attention and fla backends import;
  correctness  the GPU tests with the Triton interpreter off; relative errors of every op (Triton vs the chunked
               PyTorch path in fp32, bf16 and fp32 inputs, outputs and every gradient) at the recipes' dimensions
               (GDN 4 heads x 128/256 at T = 8K and 32K); a model-level forward+backward, Triton vs PyTorch;
  kernels      lctrain GDN vs fla chunk_gated_delta_rule, lctrain linear attention vs fla chunk_simple_gla,
               attention backends: fwd+bwd median ms (triton do_bench, grad_to_none), peak memory, T = 8K, 32K;
  attention    the fused-attention check `bench/gpu_attention.py: run(out_dir, smoke)` when present;
  peers        `bench/peers.py` on this device: lctrain vs transformers on the same model (Llama, Qwen3-Next) and
               the GDN op, bf16 autocast, fla on the peer's side when importable (the whole result in peers.json);
               skipped when transformers is not importable (optional wheels below);
  training     the ~335M 3:1 hybrid (recipes/hybrid_3to1.yaml) at 32K packed tokens, bf16 autocast, activation
               checkpointing, 1 warm-up + 3 timed steps, eager and `model.compile`: tokens/s, MFU by lctrain's
               count and by a torchtitan-style count (both labelled), peak memory.
Training here builds the model directly from the recipe (random packed tokens): it imports neither `datasets` nor
`deepspeed`.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# name -> (deadline in seconds on the GPU, run in a subprocess)
# Total 480 s, the 8-minute target. Never yet run on a GPU: the per-section split is an estimate.
SECTIONS = {
    "environment": (20, False),
    "correctness": (140, True),
    "kernels": (100, True),
    "attention": (40, True),
    "peers": (40, True),
    "training": (140, True),
}
GPU_TESTS_BUDGET = 70
SMOKE_DEADLINE = 300  # generous: the CPU suite may share a busy machine


# ------------------------------------------------------------------------------------------------ plumbing
class Section:
    """Collects a section's cases and rewrites `<out>/<name>.json` after each one."""

    def __init__(self, name: str, out: Path, smoke: bool):
        self.name, self.path, self.smoke = name, out / f"{name}.json", smoke
        self.cases: list[dict] = []
        self.status = "running"
        self.write()

    def add(self, **case) -> dict:
        self.cases.append(case)
        self.write()
        tag = case.get("case", "")
        print(f"[{self.name}] {tag}: " + ", ".join(f"{k}={_fmt(v)}" for k, v in case.items() if k != "case"),
              flush=True)
        return case

    def skip(self, reason: str) -> None:
        self.status = "skipped"
        self.add(case="skipped", reason=reason)

    def write(self) -> None:
        data = {"section": self.name, "status": self.status, "smoke": self.smoke, "cases": self.cases}
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1, default=str))
        tmp.replace(self.path)


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.3g}"
    return v


def _device(smoke: bool):
    import torch

    return torch.device("cuda" if torch.cuda.is_available() and not smoke else "cpu")


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rel(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _peak_reset(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device):
    import torch

    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def _time_ms(fn, device, grad_to_none=None) -> float:
    """Median milliseconds: triton's do_bench on the GPU, best of 2 wall-clock runs on the CPU."""
    if device.type == "cuda":
        from triton.testing import do_bench
        return float(do_bench(fn, warmup=5, rep=30, grad_to_none=grad_to_none, return_mode="median"))
    fn()
    best = float("inf")
    for _ in range(2):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


# ------------------------------------------------------------------------------------------------ environment
def section_environment(sec: Section) -> None:
    import torch
    import triton

    device = _device(sec.smoke)
    info = {"case": "versions", "python": platform.python_version(), "torch": torch.__version__,
            "triton": triton.__version__, "cuda": torch.version.cuda, "device": str(device),
            "machine": platform.machine(), "cpus": os.cpu_count()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, capability=f"{props.major}.{props.minor}",
                    memory_gib=round(props.total_memory / 2**30, 1), sms=props.multi_processor_count)
        try:
            info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                            capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            info["driver"] = None
    sec.add(**info)
    backends = {"case": "backends", "sdpa": hasattr(torch.nn.functional, "scaled_dot_product_attention")}
    for name, module in (("flash_attn", "flash_attn"), ("fla", "fla"), ("datasets", "datasets"),
                         ("lctrain_attention", "lctrain.kernels.attention"), ("deepspeed", "deepspeed")):
        try:
            __import__(module)
            backends[name] = True
        except Exception as error:  # noqa: BLE001 - any import failure means "not available"
            backends[name] = f"no ({type(error).__name__})"
    if device.type == "cuda":
        backends["sdpa_flash"] = torch.backends.cuda.flash_sdp_enabled()
    sec.add(**backends)


# ------------------------------------------------------------------------------------------------ correctness
def _op_cases(smoke: bool):
    """(name, T, builder) at the recipes' dimensions; builder(T, dtype, device) -> (fn(*leaves, backend), leaves)."""
    import torch
    import torch.nn.functional as F

    from lctrain import kernels
    from lctrain.kernels.sf_attention import sf_attention

    def mk(T, heads, dk, dv, device, gates=()):
        gen = torch.Generator(device=device).manual_seed(0)
        r = lambda *s: torch.randn(*s, generator=gen, device=device)  # noqa: E731
        q, k, v = r(1, T, heads, dk), F.normalize(r(1, T, heads, dk), dim=-1), r(1, T, heads, dv)
        extra = []
        for kind in gates:
            x = r(1, T, heads)
            extra.append(F.logsigmoid(x + 3.0) if kind == "log" else torch.sigmoid(x) * 0.9)
        return [q, k, v, *extra]

    def cu_for(T, device):
        import torch
        return torch.tensor([0, T // 4, T // 4 + 7, T], dtype=torch.int32, device=device)

    s = smoke
    lengths = (48,) if s else (8192, 32768)
    short = (48,) if s else (8192,)
    gdn = (2, 8, 16) if s else (4, 128, 256)
    yield from (("gated_delta_rule", T, lambda T, d: (
        lambda q, k, v, g, b, backend: kernels.gated_delta_rule(q, k, v, g, b, cu_seqlens=cu_for(T, d),
                                                                 backend=backend)[0],
        mk(T, *gdn, d, gates=("log", "unit")))) for T in lengths)
    lin = (2, 8, 8) if s else (8, 128, 128)
    yield from (("linear_attention", T, lambda T, d: (
        lambda q, k, v, g, backend: kernels.linear_attention(q, k, v, g, cu_seqlens=cu_for(T, d), backend=backend)[0],
        mk(T, *lin, d, gates=("log",)))) for T in lengths)
    att = (2, 8, 8) if s else (8, 128, 128)
    window = 16 if s else 4096
    yield from (("local_attention", T, lambda T, d: (
        lambda q, k, v, backend: kernels.local_attention(q, k, v, window, sink=4, cu_seqlens=cu_for(T, d),
                                                         backend=backend),
        mk(T, *att, d))) for T in short)
    group = 16 if s else 2048
    yield from (("sf_attention", T, lambda T, d: (
        lambda q, k, v, backend: sf_attention(q, k, v, group, sink=4, cu_seqlens=cu_for(T, d), backend=backend),
        mk(T, *att, d))) for T in short)
    tay = (2, 4, 8) if s else (8, 16, 64)
    yield from (("taylor_linear_attention", T, lambda T, d: (
        lambda q, k, v, backend: kernels.taylor_linear_attention(q, k, v, cu_seqlens=cu_for(T, d),
                                                                 backend=backend)[0],
        mk(T, *tay, d))) for T in short)
    lm = (2, 8, 8) if s else (8, 64, 64)
    yield from (("landmark_attention", T, lambda T, d: (
        lambda q, k, v, backend: kernels.landmark_attention(q, k, v, 8 if s else 64, cu_seqlens=cu_for(T, d),
                                                            backend=backend),
        mk(T, *lm, d))) for T in short)
    ti = (2, 8, 8) if s else (8, 64, 64)
    yield from (("titans_linear_memory", T, lambda T, d: (
        lambda q, k, v, a, e, th, backend: kernels.titans_linear_memory(
            q, k, v, a, e, th, chunk_size=16, cu_seqlens=cu_for(T, d), backend=backend)[0],
        mk(T, *ti, d, gates=("unit", "unit", "unit")))) for T in short)


def _errors(fn, leaves, dtype, test_backend, ref_backend):
    """Relative errors of fn's output and every q/k/v/gate gradient, `test_backend` on `dtype` inputs vs
    `ref_backend` on fp32 inputs."""
    import torch

    def run(backend, cast):
        xs = [(x.to(cast) if i < 3 else x).detach().requires_grad_() for i, x in enumerate(leaves)]
        o = fn(*xs, backend=backend)
        cot = torch.randn_like(o, dtype=torch.float32, generator=torch.Generator(o.device).manual_seed(1))
        (o.float() * cot).sum().backward()
        return [o] + [x.grad for x in xs]

    got, want = run(test_backend, dtype), run(ref_backend, torch.float32)
    names = ["o", "dq", "dk", "dv", "d_gate1", "d_gate2", "d_gate3"]
    return {f"err_{n}": _rel(a, b) for n, a, b in zip(names, got, want)}


def _gpu_tests(sec: Section) -> None:
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=str(ROOT))
    args = [sys.executable, "-m", "pytest", "-m", "gpu", "tests/kernels/gpu", "-q", "-p", "no:cacheprovider", "-x"]
    if sec.smoke:
        args.append("--collect-only")  # no GPU: check that the suite collects with the interpreter off
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=GPU_TESTS_BUDGET)
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-1:] or [""]
        counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|error|errors|tests? collected)",
                                                    tail[0])}
        sec.add(case="gpu tests (interpreter off)", returncode=proc.returncode, summary=tail[0],
                seconds=round(time.perf_counter() - t0, 1), **{k.replace(" ", "_"): v for k, v in counts.items()})
    except subprocess.TimeoutExpired:
        sec.add(case="gpu tests (interpreter off)", returncode=None, summary=f"timeout after {GPU_TESTS_BUDGET} s")


def _model_level(sec: Section, device) -> None:
    import torch

    from lctrain.config import load_config
    from lctrain.models import BatchContext, LanguageModel

    test, ref = ("torch", "naive") if sec.smoke else ("triton", "torch")
    width = ["model.d_model=64", "model.n_heads=2", "model.n_kv_heads=1", "model.ffn_dim=128",
             "model.vocab_size=256"] if sec.smoke else ["model.d_model=512", "model.n_heads=4", "model.n_kv_heads=2",
                                                        "model.ffn_dim=1408", "model.vocab_size=32000"]
    T = 64 if sec.smoke else 8192
    losses, grads = {}, {}
    for backend in (test, ref):
        mixers = (f"model.mixers={{gdn: {{n_heads: 2, head_k_dim: {16 if sec.smoke else 128}, "
                  f"head_v_dim: {32 if sec.smoke else 256}, backend: {backend}}}, linear: {{backend: {backend}}}}}")
        cfg = load_config(None, [*width, "model.n_layers=4", "model.pattern=GGLA", mixers]).model
        torch.manual_seed(0)
        model = LanguageModel(cfg).to(device)
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(0, cfg.vocab_size, (1, T), generator=gen)
        pos = torch.cat([torch.arange(T // 2), torch.arange(T - T // 2)])[None]
        ctx = BatchContext.from_positions(pos.to(device), host_positions=pos)
        out = model(ids.to(device), labels=ids.to(device), ctx=ctx)
        (out.loss_sum / out.n_targets).backward()
        losses[backend] = float(out.loss_sum / out.n_targets)
        grads[backend] = torch.cat([p.grad.flatten().float() for p in model.parameters() if p.grad is not None])
    sec.add(case=f"model fwd+bwd {test} vs {ref}", T=T, loss=losses[test], loss_ref=losses[ref],
            err_loss=abs(losses[test] - losses[ref]) / abs(losses[ref]), err_grads=_rel(grads[test], grads[ref]))


def section_correctness(sec: Section) -> None:
    import torch

    device = _device(sec.smoke)
    _gpu_tests(sec)
    test, ref = ("torch", "naive") if sec.smoke else ("triton", "torch")
    for name, T, build in _op_cases(sec.smoke):
        for dtype in (torch.bfloat16, torch.float32):
            try:
                fn, leaves = build(T, device)
                errs = _errors(fn, leaves, dtype, test, ref)
                sec.add(case=f"{name} T={T} {str(dtype)[6:]}", op=name, T=T, dtype=str(dtype)[6:], test=test,
                        ref=ref, **errs)
            except Exception as error:  # noqa: BLE001 - record and go on
                sec.add(case=f"{name} T={T} {str(dtype)[6:]}", op=name, error=f"{type(error).__name__}: {error}"[:300])
            finally:
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    _model_level(sec, device)


# ------------------------------------------------------------------------------------------------ kernels
def section_kernels(sec: Section) -> None:
    import torch
    import torch.nn.functional as F

    from lctrain import kernels

    device = _device(sec.smoke)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    backend = "triton" if device.type == "cuda" else "torch"
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule as fla_gdn
        from fla.ops.simple_gla import chunk_simple_gla as fla_gla
        fla_reason = None
    except Exception as error:  # noqa: BLE001
        fla_gdn = fla_gla = None
        fla_reason = f"fla not importable ({type(error).__name__}: {str(error)[:80]})"
    if device.type != "cuda" and fla_reason is None:
        fla_gdn = fla_gla = None
        fla_reason = "fla needs CUDA"
    lengths = (64, 128) if sec.smoke else (8192, 32768)
    heads, dk, dv = (2, 16, 32) if sec.smoke else (4, 128, 256)

    def inputs(T, hd=(heads, dk, dv)):
        h, a, b = hd
        q = torch.randn(1, T, h, a, device=device, dtype=dtype)
        k = F.normalize(torch.randn(1, T, h, a, device=device), dim=-1).to(dtype)
        v = torch.randn(1, T, h, b, device=device, dtype=dtype)
        g = F.logsigmoid(torch.randn(1, T, h, device=device) + 3.0)
        beta = torch.rand(1, T, h, device=device)
        return [x.requires_grad_() for x in (q, k, v, g, beta)]

    def measure(label, T, fn, leaves, **extra):
        def step():
            out = fn()
            out.float().sum().backward()
        try:
            _peak_reset(device)
            step()
            _sync(device)
            peak = _peak_gib(device)
            ms = _time_ms(step, device, grad_to_none=leaves)
            return sec.add(case=f"{label} T={T}", op=label, T=T, fwdbwd_ms=ms, peak_gib=peak,
                           tokens_per_s=T / (ms / 1e3), **extra)
        except Exception as error:  # noqa: BLE001
            return sec.add(case=f"{label} T={T}", op=label, T=T, error=f"{type(error).__name__}: {error}"[:300])

    for T in lengths:
        q, k, v, g, beta = leaves = inputs(T)
        ours = measure("lctrain gated_delta_rule", T,
                       lambda: kernels.gated_delta_rule(q, k, v, g, beta, backend=backend)[0], leaves)
        if fla_gdn is None:
            sec.add(case=f"fla chunk_gated_delta_rule T={T}", skipped=fla_reason)
        else:
            theirs = measure("fla chunk_gated_delta_rule", T, lambda: fla_gdn(q, k, v, g, beta)[0], leaves)
            if "fwdbwd_ms" in ours and "fwdbwd_ms" in theirs:
                sec.add(case=f"GDN speedup vs fla T={T}", speedup=theirs["fwdbwd_ms"] / ours["fwdbwd_ms"])
        ql, kl, vl, gl, _ = leaves_l = inputs(T, (8, dk, dk) if not sec.smoke else (2, 16, 16))
        ours = measure("lctrain linear_attention", T,
                       lambda: kernels.linear_attention(ql, kl, vl, gl, backend=backend)[0], leaves_l)
        if fla_gla is None:
            sec.add(case=f"fla chunk_simple_gla T={T}", skipped=fla_reason)
        else:
            theirs = measure("fla chunk_simple_gla", T, lambda: fla_gla(ql, kl, vl, g=gl)[0], leaves_l)
            if "fwdbwd_ms" in ours and "fwdbwd_ms" in theirs:
                sec.add(case=f"linear speedup vs fla T={T}", speedup=theirs["fwdbwd_ms"] / ours["fwdbwd_ms"])
        ha, da = (2, 16) if sec.smoke else (8, 128)
        qa, ka, va = att = [torch.randn(1, T, ha, da, device=device, dtype=dtype).requires_grad_() for _ in range(3)]
        measure("sdpa causal", T, lambda: F.scaled_dot_product_attention(
            qa.transpose(1, 2), ka.transpose(1, 2), va.transpose(1, 2), is_causal=True), att)
        try:
            from flash_attn import flash_attn_func
            measure("flash_attn causal", T, lambda: flash_attn_func(qa, ka, va, causal=True), att)
        except Exception as error:  # noqa: BLE001
            sec.add(case=f"flash_attn causal T={T}", skipped=f"flash_attn not usable ({type(error).__name__})")
        measure("lctrain local_attention w=4096", T,
                lambda: kernels.local_attention(qa, ka, va, 16 if sec.smoke else 4096, backend=backend), att)


# ------------------------------------------------------------------------------------------------ attention
def section_attention(sec: Section) -> None:
    path = ROOT / "bench" / "gpu_attention.py"
    if not path.exists():
        sec.skip("bench/gpu_attention.py (the fused-attention check) is not in this tree")
        return
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_attention", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.run(sec.path.parent, sec.smoke)
    sec.add(case="bench/gpu_attention.py run()", result=result if isinstance(result, (dict, list, str)) else None)


def section_peers(sec: Section) -> None:
    try:
        import transformers  # noqa: F401
    except ImportError:
        sec.skip("transformers is not importable (optional wheels: see this script's docstring)")
        return
    from bench import peers

    # the whole result goes into this section's JSON (the device returns few files): bench/peers.py's table and
    # plot can be made from it later
    result = peers.run(sec.path.parent, sec.smoke, patterns=("A", "GGGA", "op"), write=False)
    for row in result["rows"]:
        sec.add(case=f"{row['pattern']} vs {row['peer']}", speedup=row["speedup_median"],
                lctrain_ms=row["lctrain"]["median_s"] * 1e3, peer_ms=row["peer_time"]["median_s"] * 1e3,
                check=row["initial_loss"], fla_on_peer=result["fla_on_peer"], dtype=result["dtype"])
    sec.add(case="peers result", result=result)


# ------------------------------------------------------------------------------------------------ training
def titan_flops_per_token(model, seq_len: int) -> float:
    """torchtitan's count: 6 * non-embedding parameters + 12 * L_attn * H * d_head * T (attention counted
    non-causally)."""
    cfg = model.cfg
    n_attn = sum(1 for t in model.layer_types if t == "attn")
    head_dim = cfg.head_dim or cfg.d_model // cfg.n_heads
    return 6.0 * model.num_parameters(exclude_embedding=True) + 12.0 * n_attn * cfg.n_heads * head_dim * seq_len


def section_training(sec: Section) -> None:
    for compiled in (False, True):
        # one subprocess per configuration: an out-of-memory or compile failure costs that case only
        args = [sys.executable, __file__, "--train-case", "1" if compiled else "0", "--out", str(sec.path.parent)]
        if sec.smoke:
            args.append("--smoke")
        budget = 150 if sec.smoke else (95 if compiled else 50)  # inductor compiles two block kinds
        try:
            proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=budget,
                                  env=dict(os.environ, PYTHONPATH=str(ROOT)))
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
            if proc.returncode == 0 and lines:
                sec.add(**json.loads(lines[-1]))
            else:
                sec.add(case=f"train compile={compiled}", error=(proc.stdout + proc.stderr)[-400:])
        except subprocess.TimeoutExpired:
            sec.add(case=f"train compile={compiled}", error=f"timeout after {budget} s")


def train_case(compiled: bool, smoke: bool) -> dict:
    import torch

    from lctrain.config import load_config
    from lctrain.models import BatchContext, LanguageModel
    from lctrain.models.flops import flops_per_token, peak_flops

    device = _device(smoke)
    overrides = ["model.activation_checkpointing=true", f"model.compile={str(compiled).lower()}"]
    if smoke:
        overrides += ["model.d_model=64", "model.n_layers=4", "model.n_heads=2", "model.n_kv_heads=1",
                      "model.ffn_dim=128", "model.vocab_size=256",
                      "model.mixers={gdn: {n_heads: 2, head_k_dim: 16, head_v_dim: 32}}"]
        T = 128
    else:
        overrides += ["model.vocab_size=32000"]
        T = 32768
    cfg = load_config(str(ROOT / "recipes" / "hybrid_3to1.yaml"), overrides).model
    torch.manual_seed(0)
    model = LanguageModel(cfg).to(device)
    if compiled:
        from lctrain.models.compile import compile_blocks
        compile_blocks(model, "aot_eager" if smoke else "inductor")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    gen = torch.Generator().manual_seed(0)
    lengths = [T // 2, T // 4, T // 8, T - T // 2 - T // 4 - T // 8]  # packed documents
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step():
        ids = torch.randint(0, cfg.vocab_size, (1, T), generator=gen).to(device)
        ctx = BatchContext.from_positions(pos.to(device), host_positions=pos)
        with autocast:
            out = model(ids, labels=ids, ctx=ctx)
        (out.loss_sum / out.n_targets).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out.loss_sum.detach()

    _peak_reset(device)
    t0 = time.perf_counter()
    step()
    _sync(device)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(3):
        loss = step()
    _sync(device)
    seconds = (time.perf_counter() - t0) / 3
    tps = T / seconds
    peak = peak_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    result = {"case": f"train compile={compiled}", "compile": compiled, "T": T,
              "params_m": round(model.num_parameters() / 1e6, 1), "first_step_s": first, "step_s": seconds,
              "tokens_per_s": tps, "peak_gib": _peak_gib(device), "loss": float(loss) / T}
    if peak:
        result["mfu_lctrain"] = tps * flops_per_token(model, T) / peak
        result["mfu_torchtitan_style"] = tps * titan_flops_per_token(model, T) / peak
    return result


# ------------------------------------------------------------------------------------------------ driver
RUNNERS = {"environment": section_environment, "correctness": section_correctness, "kernels": section_kernels,
           "attention": section_attention, "peers": section_peers, "training": section_training}


def run_section(name: str, out: Path, smoke: bool) -> None:
    sec = Section(name, out, smoke)
    try:
        RUNNERS[name](sec)
        if sec.status == "running":
            sec.status = "ok"
    except Exception as error:  # noqa: BLE001
        sec.status = "error"
        sec.add(case="error", error=f"{type(error).__name__}: {error}", traceback=traceback.format_exc()[-1500:])
    sec.write()


SUMMARY_KEYS = ("summary", "fwdbwd_ms", "speedup", "tokens_per_s", "mfu_lctrain", "mfu_torchtitan_style", "peak_gib",
                "err_loss", "err_grads", "gpu", "torch", "triton", "cuda", "driver", "fla", "flash_attn", "skipped",
                "reason", "error")


def _case_values(case: dict) -> str:
    errs = {k: v for k, v in case.items() if k.startswith("err_") and k not in ("err_loss", "err_grads")
            and isinstance(v, float)}
    parts = []
    if errs:
        worst = max(errs, key=errs.get)
        parts.append(f"max err {errs[worst]:.2e} ({worst[4:]})")
    parts += [f"{k}={_fmt(case[k])}" for k in SUMMARY_KEYS if k in case and case[k] is not None]
    return ", ".join(parts)[:150]


def _summary_rows(out: Path, names) -> list[tuple[str, str, str]]:
    rows = []
    for name in names:
        path = out / f"{name}.json"
        if not path.exists():
            rows.append((name, "missing", ""))
            continue
        data = json.loads(path.read_text())
        for case in data["cases"]:
            status = "error" if "error" in case else ("skip" if "skipped" in case or case["case"] == "skipped"
                                                      else "ok")
            rows.append((f"{name}: {case['case']}", status, _case_values(case)))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", str(ROOT / "bench" / "results" / "gpu_check")))
    parser.add_argument("--smoke", action="store_true", help="every section at tiny sizes on the CPU")
    parser.add_argument("--sections", default=",".join(SECTIONS))
    parser.add_argument("--section", help=argparse.SUPPRESS)  # child mode: run one section in this process
    parser.add_argument("--train-case", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.train_case is not None:
        print(json.dumps(train_case(args.train_case == "1", args.smoke)), flush=True)
        return 0
    if args.section:
        run_section(args.section, out, args.smoke)
        return 0
    names = [n for n in args.sections.split(",") if n]
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        print(f"gpu_check: --sections {','.join(unknown)}: unknown; known: {','.join(SECTIONS)}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    for name in names:
        deadline, isolated = SECTIONS[name]
        if args.smoke:
            deadline = SMOKE_DEADLINE
        print(f"== {name} (deadline {deadline} s{', subprocess' if isolated else ''})", flush=True)
        if not isolated:
            run_section(name, out, args.smoke)
            continue
        cmd = [sys.executable, __file__, "--section", name, "--out", str(out)] + (["--smoke"] if args.smoke else [])
        try:
            proc = subprocess.run(cmd, cwd=ROOT, timeout=deadline, env=dict(os.environ, PYTHONPATH=str(ROOT)))
            crashed = proc.returncode != 0
        except subprocess.TimeoutExpired:
            crashed = None
        path = out / f"{name}.json"
        data = json.loads(path.read_text()) if path.exists() else {"section": name, "cases": []}
        if crashed is None or crashed or data.get("status") == "running":
            data["status"] = "timeout" if crashed is None else ("crashed" if crashed else data.get("status"))
            data["cases"].append({"case": data["status"], "error": f"section stopped ({data['status']}) after "
                                                                   f"{deadline} s budget; cases above were measured"})
            path.write_text(json.dumps(data, indent=1, default=str))
    rows = _summary_rows(out, names)
    width = max(len(r[0]) for r in rows) if rows else 10
    print(f"\n{'case':{width}}  status  values")
    for case, status, values in rows:
        print(f"{case:{width}}  {status:6}  {values}")
    print(f"\ntotal {time.perf_counter() - start:.0f} s; JSON in {out}")
    summary = {"seconds": round(time.perf_counter() - start, 1), "smoke": args.smoke,
               "rows": [dict(zip(("case", "status", "values"), r)) for r in rows]}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
