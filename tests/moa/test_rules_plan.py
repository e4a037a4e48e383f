"""MoA rules (windows, density closed form, masks) and plan files (round trip, every bad-input error)."""
import json
import math

import pytest
import torch

from lctrain.config import ConfigError
from lctrain.kernels.local_attention import naive_local_attention
from lctrain.moa.plan import (dense_plan, head_rules, head_windows, load_plan, plan_sink, save_plan,
                              uniform_plan)
from lctrain.moa.rules import DEFAULT_ALPHAS, DEFAULT_BETAS, Rule, density, parse_grid, rule_density, rule_mask


def _brute_pairs(window, sink, n):
    return sum(1 for i in range(n) for j in range(i + 1) if i - j < window or j < sink)


def test_density_closed_form_matches_brute_force():
    for n in range(1, 19):
        for window in range(1, n + 3):
            for sink in range(0, n + 3):
                want = _brute_pairs(window, sink, n) / (n * (n + 1) / 2)
                assert density(window, sink, n) == pytest.approx(want, abs=1e-15), (window, sink, n)


def test_density_edges_and_errors():
    assert density(10, 0, 10) == 1.0 and density(100, 5, 10) == 1.0
    assert density(1, 0, 1000) == pytest.approx(1000 / (1000 * 1001 / 2))
    assert density(4000, 64, 8192) < 1.0
    for bad in ((0, 0, 5), (1, -1, 5), (1, 0, 0)):
        with pytest.raises(ValueError, match="density"):
            density(*bad)


def test_rule_windows():
    assert Rule(0, 1).window(4096) == 4096 and Rule(0, 1).is_dense(4096)
    assert Rule(64, 0).window(4096) == 64 and not Rule(64, 0).is_dense(4096)
    assert Rule(64, 0).window(10) == 10  # capped at N
    assert Rule(0, 0).window(100) == 1  # at least the token itself
    assert Rule(128, 0.25).window(1000) == 378
    assert Rule(0, 0.5).window(5) == 3  # 2.5 rounds half up
    assert Rule(1024, 0.5).window(4096) == 3072
    assert Rule(100, 0).is_dense(160, sink=64) and not Rule(100, 0).is_dense(165, sink=64)
    with pytest.raises(ValueError):
        Rule(1, 1).window(0)


def test_rule_mask_matches_density_and_kernel():
    for rule, sink, n in ((Rule(3, 0), 2, 12), (Rule(0, 0.25), 0, 17), (Rule(2, 0.5), 4, 9), (Rule(0, 1), 3, 7)):
        mask = rule_mask(rule, sink, n)
        assert mask.dtype == torch.bool and mask.shape == (n, n)
        assert mask.sum().item() == _brute_pairs(rule.window(n), sink, n)
        assert rule_density(rule, sink, n) == pytest.approx(mask.sum().item() / (n * (n + 1) / 2))
        # same pattern as the local_attention reference: a query's output depends only on the admitted keys
        q, k = torch.randn(1, n, 1, 4, dtype=torch.float64), torch.randn(1, n, 1, 4, dtype=torch.float64)
        v = torch.eye(n, dtype=torch.float64)[None, :, None, :]  # value j = e_j: output i = attention weights
        weights = naive_local_attention(q, k, v, rule.window(n), sink, 0.5, None)[0, :, 0, :]
        assert torch.equal(weights > 0, mask)


def test_parse_grid():
    rules = parse_grid([0, 64, 64], [0, 1.0, 1])
    assert rules == [Rule(0, 0), Rule(0, 1), Rule(64, 0), Rule(64, 1)]
    default = parse_grid(DEFAULT_ALPHAS, DEFAULT_BETAS)
    assert len(default) == len(DEFAULT_ALPHAS) * len(DEFAULT_BETAS) and Rule(0, 1) in default
    for alphas, betas in (([-1], [0]), ([0], [-0.5]), ([math.nan], [0]), (["a"], [0]), ([], [0]), ([0], [True])):
        with pytest.raises(ValueError, match="moa rule grid") as info:
            parse_grid(alphas, betas)
        assert "\n" not in str(info.value)


# ----------------------------------------------------------------------------------------------- plans
def _plan():
    plan = uniform_plan(Rule(64, 0.25), [0, 2], n_heads=3, sink=16)
    plan["layers"]["2"][1] = [0.0, 1.0]
    plan["density"], plan["lengths"], plan["summary"] = 0.5, [128, 256], {"total_loss": 1.5}
    return plan


def test_plan_round_trip_and_helpers(tmp_path):
    plan = _plan()
    path = save_plan(plan, tmp_path / "sub" / "plan.json")
    assert sorted(p.name for p in path.parent.iterdir()) == ["plan.json"]  # no temp file left
    back = load_plan(path, n_layers=3, n_heads=3)
    assert back == plan and plan_sink(back) == 16
    assert head_windows(back, 0, 1000).tolist() == [314, 314, 314]
    assert head_windows(back, 2, 1000).tolist() == [314, 1000, 314]
    assert head_windows(back, 2, 1000).dtype == torch.long
    assert head_windows(back, 1, 1000) is None and head_rules(back, 1) is None
    dense = dense_plan(2, n_heads=4, sink=8)
    assert sorted(dense["layers"]) == ["0", "1"] and head_windows(dense, 1, 77).tolist() == [77] * 4
    save_plan(dense, path)  # overwrite in place
    assert load_plan(path) == dense


@pytest.mark.parametrize("mutate, message", [
    (lambda p: p.update(format="other"), "format"),
    (lambda p: p.update(version=2), "version"),
    (lambda p: p.update(sink=-1), "sink"),
    (lambda p: p.update(n_heads=0), "n_heads"),
    (lambda p: p.update(layers=[]), "layers"),
    (lambda p: p["layers"].update({"x": p["layers"]["0"]}), "not an integer"),
    (lambda p: p["layers"].update({"-1": p["layers"]["0"]}), "non-negative"),
    (lambda p: p["layers"].update({"5": p["layers"]["0"]}), "out of range"),
    (lambda p: p["layers"]["0"].pop(), "head rules"),
    (lambda p: p["layers"]["0"].__setitem__(0, [-1.0, 0.5]), ">= 0"),
    (lambda p: p["layers"]["0"].__setitem__(0, [1.0, -0.5]), ">= 0"),
    (lambda p: p["layers"]["0"].__setitem__(0, [1.0]), "alpha, beta"),
    (lambda p: p["layers"]["0"].__setitem__(0, ["a", 1]), "alpha, beta"),
    (lambda p: p.update(density=1.5), "density"),
    (lambda p: p.update(lengths=[0]), "lengths"),
])
def test_load_plan_errors(tmp_path, mutate, message):
    plan = _plan()
    mutate(plan)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(plan))
    with pytest.raises(ValueError, match=message) as info:
        load_plan(path, n_layers=3)
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    assert isinstance(info.value, ConfigError)


def test_load_plan_file_errors(tmp_path):
    with pytest.raises(ValueError, match="file not found"):
        load_plan(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON") as info:
        load_plan(bad)
    assert "\n" not in str(info.value)
    bad.write_text("[1, 2]")
    with pytest.raises(ValueError, match="JSON object"):
        load_plan(bad)
    good = tmp_path / "good.json"
    save_plan(_plan(), good)
    with pytest.raises(ValueError, match="n_heads=3 but the model has 4"):
        load_plan(good, n_heads=4)
    with pytest.raises(ValueError, match="out of range"):
        load_plan(good, n_layers=2)
    with pytest.raises(ValueError):  # save validates too and writes nothing
        save_plan({"format": "lctrain-moa-plan"}, tmp_path / "never.json")
    assert not (tmp_path / "never.json").exists()
