"""Is a Titans export's logit difference from lctrain the export's or the model's? Compares, against lctrain in
float64 (the reference), four float32 computations of the same trained model and input:

  lctrain fp32                 lctrain's own kernels
  export fp32, no lctrain      the exported pure-PyTorch ops, in a process where importing lctrain fails
  export fp32, lctrain ops     the exported modeling code using lctrain's kernels
and the export in float64 without lctrain (is its math lctrain's?), plus lctrain fp32 with a 1e-6 relative
perturbation of the embeddings (how far rounding-sized noise moves this model's logits).

    python bench/export_titans_precision.py RUN_DIR [--lengths 128,1024]

Writes bench/results/export_titans_precision_cpu.json and prints max |logit difference| per length.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
# bench/ itself must not be on the path: a script there could shadow a package transformers probes.
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import lctrain  # noqa: E402
from lctrain.export.hf_export import export_run  # noqa: E402

STANDALONE = textwrap.dedent("""
    import sys
    sys.modules["lctrain"] = None  # the export as a user without lctrain runs it
    import torch
    from transformers import AutoModelForCausalLM
    out, ids_file, result_file = sys.argv[1:4]
    ids = torch.load(ids_file)
    results = {}
    for name, dtype in (("fp32", torch.float32), ("fp64", torch.float64)):
        model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=dtype).eval()
        with torch.no_grad():
            results[name] = [model(row[None]).logits.double() for row in ids]
    torch.save(results, result_file)
""")


def logits(model, ids, dtype, perturb=0.0):
    model = model.to(dtype)
    hook = None
    if perturb:
        generator = torch.Generator().manual_seed(0)
        hook = model.embed.register_forward_hook(
            lambda m, a, o: o * (1 + perturb * torch.randn(o.shape, generator=generator, dtype=o.dtype)))
    with torch.no_grad():
        out = model(ids, return_logits=True).logits.double()
    if hook is not None:
        hook.remove()
    return out


def memory_growth(model, ids):
    """Largest |memory| entry after each memory write (linear memory), from a float64 run: [per call]."""
    import lctrain.models.mixers.titans as titans

    original, sizes = titans.titans_linear_memory, []

    def recording(*args, **kwargs):
        o, state = original(*args, **kwargs)
        sizes.append(state[0].abs().max().item())
        return o, state
    titans.titans_linear_memory = recording
    try:
        logits(model, ids, torch.float64)
    finally:
        titans.titans_linear_memory = original
    return sizes


def main() -> None:
    from transformers import AutoModelForCausalLM

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir")
    p.add_argument("--lengths", default="128,1024")
    p.add_argument("--out-dir", default=str(ROOT / "bench" / "results"))
    args = p.parse_args()
    lengths = [int(n) for n in args.lengths.split(",")]
    model = lctrain.load_model(args.run_dir)[0].lm.eval()
    vocab = model.cfg.vocab_size
    generator = torch.Generator().manual_seed(0)
    ids = [torch.randint(3, vocab, (n,), generator=generator) for n in lengths]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        out = export_run(args.run_dir, Path(tmp) / "export")
        torch.save(ids, Path(tmp) / "ids.pt")
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "LCTRAIN_HF_KERNELS")}
        env["HF_MODULES_CACHE"] = str(Path(tmp) / "modules")
        proc = subprocess.run([sys.executable, "-I", "-c", STANDALONE, str(out), str(Path(tmp) / "ids.pt"),
                               str(Path(tmp) / "standalone.pt")], env=env, capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(proc.stderr[-3000:])
        standalone = torch.load(Path(tmp) / "standalone.pt")
        with_lctrain = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).eval()
        for i, row in enumerate(ids):
            x = row[None]
            reference = logits(model, x, torch.float64)
            with torch.no_grad():
                export_own = with_lctrain(x).logits.double()
            found = {
                "lctrain_fp32": logits(model, x, torch.float32),
                "export_fp32_without_lctrain": standalone["fp32"][i],
                "export_fp32_with_lctrain_ops": export_own,
                "export_fp64_without_lctrain": standalone["fp64"][i],
                "lctrain_fp32_embeddings_x(1+1e-6 noise)": logits(model, x, torch.float32, perturb=1e-6),
            }
            row_result = {"length": len(row), "logit_scale": reference.abs().max().item()}
            row_result.update({name: (value - reference).abs().max().item() for name, value in found.items()})
            row_result["memory_max_per_write_fp64"] = memory_growth(model, x)
            row_result["export_fp32_vs_lctrain_fp32"] = (found["export_fp32_without_lctrain"]
                                                         - found["lctrain_fp32"]).abs().max().item()
            rows.append(row_result)
            print(json.dumps({k: v for k, v in row_result.items() if not isinstance(v, list)}), flush=True)
            print(f"  |memory| per write: {' '.join(f'{v:.0e}' for v in row_result['memory_max_per_write_fp64'])}")
    result = {"device": f"{platform.machine()} {os.cpu_count()}-core CPU, torch {torch.__version__}",
              "model": {"pattern": model.cfg.pattern, "d_model": model.cfg.d_model, "mixers": model.cfg.mixers},
              "reference": "lctrain in float64", "rows": rows}
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "export_titans_precision_cpu.json"
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(path)


if __name__ == "__main__":
    main()
