"""`python -m lctrain plan`: the JSON contract, the choice of the best candidate, the reasons for ruling others
out, behaviour of the models the plan is built from, and one-line errors for bad input."""
import dataclasses
import json

import pytest

from lctrain.cli import main
from lctrain.cli_args import find_recipe
from lctrain.config import load_config
from lctrain.plan.candidate import Candidate, Workload
from lctrain.plan.comm import sp_bytes_per_step
from lctrain.plan.gpus import GPUS, load_measured_efficiency
from lctrain.plan.memory import memory_breakdown
from lctrain.plan.search import plan
from lctrain.plan.shape import model_shape

CONTRACT = ("dp", "sp", "attn", "engine", "memory_gib", "comm_bytes_per_step", "step_time_s", "tokens_per_s", "mfu")


@pytest.fixture(scope="module")
def hybrid():
    cfg = load_config(find_recipe("hybrid_3to1"), [])
    return cfg, model_shape(cfg)


def test_json_contract_best_and_current(tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert main(["plan", "hybrid_3to1", "--gpus", "16", "parallel.sp=2", "--json", str(out)]) == 0  # flags anywhere
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert set(result) >= {"current", "best", "candidates"}
    for entry in [result["current"], result["best"]] + result["candidates"]:
        assert all(key in entry for key in CONTRACT), entry
        assert entry["dp"] * entry["sp"] == 16
    fitting = [e for e in result["candidates"] if e["fits"]]
    assert fitting and result["best"] == max(fitting, key=lambda e: e["tokens_per_s"])
    assert all(e["memory_gib"] <= GPUS["h100"].memory_gib for e in fitting)
    assert all(set(e["comm_bytes_per_step"]) == {"linear", "attn", "conv"} for e in fitting)
    current = result["current"]
    assert (current["sp"], current["dp"], current["attn"], current["engine"]) == (2, 8, "ring", "ddp")
    assert current["comm_bytes_per_step"]["attn"] > 0 and current["comm_bytes_per_step"]["linear"] > 0
    # the table marks the best and names what rules the others out
    assert "*" in printed and "ruled out" in printed and "out of memory" in printed


def test_ulysses_ruled_out_where_heads_do_not_divide(hybrid):
    cfg, shape = hybrid
    result = plan(cfg, 8, GPUS["h100"], shape=shape)
    ulysses8 = [e for e in result["candidates"] if e["attn"] == "ulysses" and e["sp"] == 8]
    assert ulysses8 and all(not e["fits"] and "ulysses needs heads (8) and kv heads (4)" in e["ruled_out"][0]
                            for e in ulysses8)
    assert any(e["fits"] for e in result["candidates"] if e["attn"] == "ulysses" and e["sp"] == 4)


def test_lasp2_traffic_is_length_independent_attention_traffic_is_not(hybrid):
    _, shape = hybrid
    per_length = {}
    for seq_len in (32768, 65536):
        cand = Candidate(8, 8, "ring", "zigzag", "ddp", False, 1)
        work = Workload(seq_len=seq_len, tokens_per_step=seq_len)      # one micro-batch per step
        per_length[seq_len] = sp_bytes_per_step(shape, cand, work)
    assert per_length[32768]["linear"] == per_length[65536]["linear"] > 0
    assert per_length[65536]["attn"] == 2 * per_length[32768]["attn"]
    assert per_length[65536]["conv"] == per_length[32768]["conv"]     # halos: k - 1 tokens per boundary


def test_engines_and_checkpointing_move_memory_the_right_way(hybrid):
    _, shape = hybrid
    work = Workload(seq_len=32768, tokens_per_step=64 * 32768)
    total, states = {}, {}
    for engine in ("ddp", "zero1", "zero2", "zero3", "fsdp"):
        for ckpt in (False, True):
            parts = memory_breakdown(shape, Candidate(64, 1, "ring", "zigzag", engine, ckpt, 1), work)
            total[engine, ckpt] = parts["total_gib"]
            states[engine, ckpt] = parts["params"] + parts["grads"] + parts["optimizer"]
    # sharding removes model state stage by stage; gradients only matter once activations are gone, so the
    # peak falls from ddp to zero1 and then stays
    assert states["ddp", False] > states["zero1", False] > states["zero2", False] > states["zero3", False]
    assert total["ddp", False] > total["zero1", False] >= total["zero2", False]
    assert total["fsdp", False] < total["ddp", False]
    assert all(total[e, True] < total[e, False] / 2 for e in ("ddp", "fsdp"))


def test_measured_efficiency_replaces_defaults(tmp_path):
    (tmp_path / "gpu_check_h100.json").write_text(json.dumps(
        {"device": "NVIDIA H100 80GB HBM3", "plan_efficiency": {"matmul": 0.5, "attention": 0.3}}))
    (tmp_path / "gpu_check_a100.json").write_text(json.dumps(
        {"device": "NVIDIA A100-SXM4-80GB", "plan_efficiency": {"matmul": 0.9}}))
    gpu = load_measured_efficiency(GPUS["h100"], "h100", tmp_path)
    assert gpu.efficiency["matmul"] == 0.5 and gpu.efficiency["attention"] == 0.3
    assert gpu.efficiency["recurrent"] == GPUS["h100"].efficiency["recurrent"]
    assert gpu.efficiency_source == "gpu_check_h100.json"
    assert load_measured_efficiency(GPUS["b200"], "b200", tmp_path) == GPUS["b200"]


def test_slower_network_slows_dp_heavy_plans(hybrid):
    cfg, shape = hybrid
    fast = plan(cfg, 64, GPUS["h100"], shape=shape)
    slow_gpu = dataclasses.replace(GPUS["h100"], inter_bw=GPUS["h100"].inter_bw / 100)
    slow = plan(cfg, 64, slow_gpu, shape=shape)
    assert slow["current"]["step_time_s"] > fast["current"]["step_time_s"]
    assert slow["best"]["tokens_per_s"] <= fast["best"]["tokens_per_s"]


@pytest.mark.parametrize("argv, message", [
    (["plan", "hybrid_3to1", "--gpus", "8", "--gpu", "tpu"], "--gpu must be one of h100, h200, a100, b200"),
    (["plan", "hybrid_3to1", "--gpus", "0"], "--gpus must be a positive integer"),
    (["plan", "hybrid_3to1", "--gpus", "8", "--gpus-per-node", "0"], "--gpus-per-node must be a positive integer"),
    (["plan", "titans_mac", "--gpus", "8"], "planner does not model"),
    (["plan", "no_such_recipe", "--gpus", "8"], "recipe: file not found"),
])
def test_bad_input_is_one_line_and_exit_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_recipe_configuration_that_cannot_run_is_explained(capsys):
    assert main(["plan", "hybrid_3to1", "parallel.sp=3", "--gpus", "8"]) == 0
    assert "cannot run: sp=3 does not divide 8 GPUs" in capsys.readouterr().out


def test_sp_attention_work_follows_the_block_skipping(hybrid):
    """The SP attention computes only visible blocks: contiguous ring/allgather leave the last rank the whole
    prefix (slower than zigzag), ulysses spreads heads over the whole sequence (same work under both layouts)."""
    from lctrain.plan.compute import flops_per_micro_step
    _, shape = hybrid
    def attention(attn, layout):
        return flops_per_micro_step(shape, 1, 131072, 8, layout, False, attn=attn)["attention"]
    assert attention("ring", "contiguous") > 1.8 * attention("ring", "zigzag")
    assert attention("allgather", "contiguous") == attention("ring", "contiguous")
    assert attention("ulysses", "contiguous") == attention("ulysses", "zigzag") == attention("ring", "zigzag")
    # the busiest zigzag rank does 1/8 of the single-GPU attention
    assert attention("ring", "zigzag") == pytest.approx(
        flops_per_micro_step(shape, 1, 131072, 1, "contiguous", False)["attention"] / 8, rel=1e-4)
