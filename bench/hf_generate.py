"""Hugging Face `generate()` on lctrain exports: with the export's cache (one token per step after the prompt)
against `use_cache=False` (the whole sequence every step), per layer pattern, on tiny randomly initialised models.

    python bench/hf_generate.py                       # CPU: 1024-token prompt + 64 new tokens
    python bench/hf_generate.py --prompt 256 --new 16 # quicker

Both runs must give the same tokens (asserted). Writes bench/results/hf_generate_<cpu|gpu>.{json,png} and prints
a table: seconds per generate call (median of --repeats) and the forward input lengths of the cached run.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
# bench/ itself must not be on the path: a script there could shadow a package transformers probes.
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from lctrain.config import ModelConfig  # noqa: E402
from lctrain.data.tokenizer import Tokenizer, train_tokenizer  # noqa: E402
from lctrain.export.hf_export import export_model  # noqa: E402
from lctrain.models import LanguageModel  # noqa: E402

# Titans is left out: its exported decoding recomputes the layer on all inputs each step (as lctrain's does).
PATTERNS = {"GGGA": {}, "CBCSC": {"conv": {"kernel_size": 4}, "based": {"feature_dim": 8}, "swa": {"window": 64}},
            "MA": {"landmark": {"block_size": 64}}, "LLLA": {}}


def tokenizer() -> Tokenizer:
    import glob
    import sysconfig
    lines = []
    for path in sorted(glob.glob(sysconfig.get_paths()["stdlib"] + "/*.py"))[:20]:
        with open(path, errors="replace") as f:
            lines += [line for line in f.read().splitlines() if line.strip()]
    return Tokenizer(train_tokenizer(lines, 400))


def time_generate(hf, prompt, new, use_cache, repeats):
    lengths = []
    hook = hf.register_forward_pre_hook(lambda m, a, k: lengths.append(k["input_ids"].shape[1]), with_kwargs=True)
    times, out = [], None
    for _ in range(repeats):
        lengths.clear()
        start = time.perf_counter()
        out = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new, min_new_tokens=new,
                          do_sample=False, use_cache=use_cache)
        times.append(time.perf_counter() - start)
    hook.remove()
    return statistics.median(times), out, list(lengths)


def main() -> None:
    from transformers import AutoModelForCausalLM

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompt", type=int, default=1024)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out-dir", default=str(ROOT / "bench" / "results"))
    args = p.parse_args()
    torch.manual_seed(0)
    tok = tokenizer()
    rows = []
    for pattern, mixers in PATTERNS.items():
        cfg = ModelConfig(vocab_size=tok.vocab_size + 1, d_model=64, n_layers=len(pattern), n_heads=4, ffn_dim=128,
                          pattern=pattern, mixers=mixers)
        model = LanguageModel(cfg).eval()
        with tempfile.TemporaryDirectory() as tmp:
            out = export_model(model, tok, tmp, max_positions=args.prompt + args.new, remote_code=True)
            hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).eval()
        prompt = torch.randint(3, tok.vocab_size, (1, args.prompt))
        cached_s, cached, lengths = time_generate(hf, prompt, args.new, True, args.repeats)
        full_s, full, _ = time_generate(hf, prompt, args.new, False, args.repeats)
        assert torch.equal(cached, full), pattern
        rows.append({"pattern": pattern, "cached_s": cached_s, "no_cache_s": full_s, "speedup": full_s / cached_s,
                     "forward_lengths": lengths})
        print(f"{pattern:>6}  cached {cached_s:7.3f} s  use_cache=False {full_s:7.3f} s  "
              f"x{full_s / cached_s:5.1f}  forward lengths {lengths[:3]}...({len(lengths)} calls)", flush=True)
    device = "gpu" if torch.cuda.is_available() else "cpu"
    result = {"device": f"{platform.machine()} {os.cpu_count()}-core CPU, torch {torch.__version__}",
              "prompt": args.prompt, "new_tokens": args.new, "repeats": args.repeats, "rows": rows}
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"hf_generate_{device}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    plot(result, path.with_suffix(".png"))
    print(path)


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], [r["no_cache_s"] for r in rows], width=0.4, label="use_cache=False")
    ax.bar([i + 0.2 for i in x], [r["cached_s"] for r in rows], width=0.4, label="cache")
    ax.set_xticks(list(x), [r["pattern"] for r in rows])
    ax.set_ylabel("seconds per generate()")
    ax.set_title(f"{result['prompt']}-token prompt + {result['new_tokens']} tokens")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
