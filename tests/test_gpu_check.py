"""`bench/gpu_check.py --smoke`: every section runs at tiny sizes on the CPU, writes its JSON (at most 8 files),
records real error values and timings, skips the fla and missing parts with a reason, and prints one summary table;
and training on a synthetic source imports neither `datasets` nor `deepspeed` (the GPU machine has neither)."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _env():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    return env


def test_smoke_runs_every_section(tmp_path):
    proc = subprocess.run([sys.executable, "bench/gpu_check.py", "--smoke", "--out", str(tmp_path)], cwd=ROOT,
                          env=_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) <= 8 and {"environment.json", "correctness.json", "kernels.json", "attention.json",
                                "peers.json", "training.json", "summary.json"} <= set(files), files
    sections = {name: json.loads((tmp_path / f"{name}.json").read_text())
                for name in ("environment", "correctness", "kernels", "attention", "peers", "training")}
    for name, data in sections.items():
        assert data["status"] in ("ok", "skipped") and data["smoke"], (name, data["status"])
        assert all("error" not in case for case in data["cases"]), (name, data["cases"])
    # correctness: every op in bf16 and fp32 with recorded errors against the reference backend
    ops = [c for c in sections["correctness"]["cases"] if "op" in c]
    assert len({c["op"] for c in ops}) == 7 and len(ops) == 14
    for case in ops:
        errors = [v for k, v in case.items() if k.startswith("err_")]
        assert len(errors) >= 4 and max(errors) < (5e-2 if case["dtype"] == "bfloat16" else 1e-4), case
    model = [c for c in sections["correctness"]["cases"] if c["case"].startswith("model fwd+bwd")]
    assert model and model[0]["err_grads"] < 1e-4
    # kernels: timings recorded; fla skipped with the reason
    timed = [c for c in sections["kernels"]["cases"] if "fwdbwd_ms" in c]
    assert timed and all(c["fwdbwd_ms"] > 0 for c in timed)
    assert any("fla" in c["case"] and "not importable" in c.get("skipped", "") for c in sections["kernels"]["cases"])
    # peers: lctrain vs transformers (Llama, Qwen3-Next, the GDN op) timed, initial checks recorded
    compared = [c for c in sections["peers"]["cases"] if "speedup" in c]
    assert [c["case"].split(" vs ")[1] for c in compared] == ["LlamaForCausalLM", "Qwen3NextForCausalLM",
                                                             "transformers torch_chunk_gated_delta_rule"]
    assert all(c["speedup"] > 0 and c["lctrain_ms"] > 0 for c in compared)
    # training: eager and model.compile, tokens/s measured
    runs = sections["training"]["cases"]
    assert sorted(c["compile"] for c in runs) == [False, True] and all(c["tokens_per_s"] > 0 for c in runs)
    assert "case" in proc.stdout and "total" in proc.stdout  # the summary table


def test_unknown_section_is_one_line_exit_2(tmp_path):
    proc = subprocess.run([sys.executable, "bench/gpu_check.py", "--sections", "nope", "--out", str(tmp_path)],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "unknown" in proc.stderr


BLOCKED = """
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ("datasets", "deepspeed"):
            raise ImportError("blocked " + name)
sys.meta_path.insert(0, Block())
from lctrain.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_synthetic_training_imports_neither_datasets_nor_deepspeed(tmp_path):
    args = ["recipes/mqar_hybrid.yaml", f"run.dir={tmp_path / 'run'}", "train.steps=2", "train.micro_batch_size=4",
            "train.eval_interval=0", "checkpoint.interval=0", "logging.progress=plain", "logging.tensorboard=false",
            "data.sources=[{type: mqar, num_examples: 50}]"]
    env = dict(_env(), LCTRAIN_CACHE=str(tmp_path / "cache"))
    proc = subprocess.run([sys.executable, "-c", BLOCKED, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "step 2 loss" in proc.stdout
