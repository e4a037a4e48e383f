"""MoA MILP search on synthetic profiles: budget met, rule limit, beats uniform, exact on tiny instances; CLI."""
import itertools

import numpy as np
import pytest
import torch

from lctrain.config import ConfigError
from lctrain.moa.command import moa_main
from lctrain.moa.plan import head_windows, load_plan
from lctrain.moa.rules import Rule, parse_grid, rule_density
from lctrain.moa.search import check_profile, lowest_density, search, summarize

SINK = 4


def make_profile(n_layers, heads, rules, lengths, loss, dens=None, layers=None):
    if dens is None:
        dens = [[rule_density(r, SINK, n) for n in lengths] for r in rules]
    return {"format": "lctrain-moa-profile", "version": 1, "rules": [r.as_list() for r in rules], "sink": SINK,
            "lengths": list(lengths), "layers": list(layers if layers is not None else range(n_layers)),
            "n_heads": heads, "loss": torch.as_tensor(np.asarray(loss), dtype=torch.float64),
            "density": torch.as_tensor(np.asarray(dens), dtype=torch.float64), "num_docs": 3, "source": "synthetic"}


def random_profile(seed, n_layers=3, heads=4, lengths=(64, 128)):
    rng = np.random.default_rng(seed)
    rules = parse_grid([0, 8, 16], [0, 0.25, 0.5, 1.0])
    dens = np.array([[rule_density(r, SINK, n) for n in lengths] for r in rules])
    # sparser rules cost more, with per-head sensitivity; a few negative entries as real profiles have
    sens = rng.gamma(1.0, 1.0, size=(n_layers, heads, 1, 1))
    loss = sens * (1 - dens)[None, None] * rng.uniform(0.5, 1.5, size=(n_layers, heads, len(rules), len(lengths)))
    loss -= 0.02 * rng.random(loss.shape)
    return make_profile(n_layers, heads, rules, lengths, loss, dens)


def plan_choice(plan, profile):
    """Per (layer, head) rule index of a plan, by matching [alpha, beta] against the profile's rules."""
    index = {tuple(map(float, r)): i for i, r in enumerate(profile["rules"])}
    return np.array([[index[tuple(r)] for r in plan["layers"][str(l)]] for l in profile["layers"]])


def objective(choice, profile):
    loss = profile["loss"].numpy()
    return float(sum(loss[l, h, choice[l, h]].sum() for l in range(choice.shape[0]) for h in range(choice.shape[1])))


def mean_density(choice, profile):
    return profile["density"].numpy()[choice.reshape(-1)].mean(axis=0)


def check_plan(plan, profile, target, k):
    choice = plan_choice(plan, profile)
    dens = mean_density(choice, profile)
    assert (dens <= target + 1e-9).all()
    assert np.allclose(plan["summary"]["achieved_density"], dens)
    assert all(len(set(row.tolist())) <= k for row in choice)
    assert plan["summary"]["total_loss"] == pytest.approx(objective(choice, profile), abs=1e-9)
    for l in profile["layers"]:
        assert sum(e["heads"] for e in plan["summary"]["layers"][str(l)]) == profile["n_heads"]
        assert len(plan["summary"]["layers"][str(l)]) <= k
    uniform = plan["summary"]["uniform"]
    if uniform is not None:
        assert plan["summary"]["total_loss"] <= uniform["loss"] + 1e-9
        assert all(d <= target + 1e-9 for d in uniform["density"])
    return choice


@pytest.mark.parametrize("seed, target, k", [(0, 0.5, 2), (1, 0.35, 2), (2, 0.6, 1), (3, 0.45, 3)])
def test_random_profiles_meet_budget_and_beat_uniform(seed, target, k):
    profile = random_profile(seed)
    plan = search(profile, target, max_rules_per_layer=k)
    assert plan["format"] == "lctrain-moa-plan" and plan["density"] == target and plan["sink"] == SINK
    assert plan["summary"]["optimal"]
    check_plan(plan, profile, target, k)
    text = summarize(plan)
    assert "achieved density" in text and "best uniform plan" in text


def test_constructed_case_gives_expensive_heads_dense_rules():
    # rules: dense (density 1), medium (0.5), sparse (0.25) at one length; heads 0,1 suffer from sparsity, 2,3 not
    rules = [Rule(0, 1), Rule(0, 0.5), Rule(0, 0.25)]
    dens = [[1.0], [0.5], [0.25]]
    loss = np.zeros((2, 4, 3, 1))
    loss[:, :2, 1], loss[:, :2, 2] = 5.0, 10.0
    loss[:, 2:, 1], loss[:, 2:, 2] = 0.05, 0.1
    profile = make_profile(2, 4, rules, [1024], loss, dens)
    plan = search(profile, 0.625)  # = (2 * 1 + 2 * 0.25) / 4: exactly two dense heads and two sparse per layer
    choice = check_plan(plan, profile, 0.625, 2)
    assert choice.tolist() == [[0, 0, 2, 2], [0, 0, 2, 2]]
    assert plan["summary"]["total_loss"] == pytest.approx(0.4)
    uniform = plan["summary"]["uniform"]
    assert uniform["rule"] == [0.0, 0.5] and uniform["loss"] == pytest.approx(2 * 10.1)
    assert plan["summary"]["total_loss"] < uniform["loss"]
    assert head_windows(plan, 1, 1024).tolist() == [1024, 1024, 256, 256]


def _brute_force(profile, target, k):
    loss, dens = profile["loss"].numpy(), profile["density"].numpy()
    n_layers, heads, n_rules, _ = loss.shape
    best = np.inf
    for flat in itertools.product(range(n_rules), repeat=n_layers * heads):
        choice = np.array(flat).reshape(n_layers, heads)
        if any(len(set(row.tolist())) > k for row in choice):
            continue
        if (dens[choice.reshape(-1)].mean(axis=0) > target + 1e-12).any():
            continue
        best = min(best, loss[np.arange(n_layers)[:, None], np.arange(heads)[None, :], choice].sum())
    return best


@pytest.mark.parametrize("seed, target, k", [(10, 0.5, 1), (11, 0.55, 2), (12, 0.62, 2), (13, 0.7, 1), (14, 0.5, 4)])
def test_tiny_instances_are_optimal(seed, target, k):
    rng = np.random.default_rng(seed)
    rules = [Rule(0, 1), Rule(4, 0.25), Rule(0, 0.5), Rule(2, 0)]
    lengths = [32, 64]
    dens = np.array([[rule_density(r, SINK, n) for n in lengths] for r in rules])
    loss = rng.normal(size=(2, 3, 4, 2)) + (1 - dens)[None, None] * rng.uniform(0, 3, size=(2, 3, 1, 1))
    loss[:, :, 0] = 0.0  # dense is the reference
    profile = make_profile(2, 3, rules, lengths, loss, dens)
    want = _brute_force(profile, target, k)
    if not np.isfinite(want):
        with pytest.raises(ValueError, match="lowest achievable"):
            search(profile, target, k)
        return
    plan = search(profile, target, max_rules_per_layer=k)
    check_plan(plan, profile, target, k)
    assert plan["summary"]["total_loss"] == pytest.approx(want, abs=1e-9)


def test_infeasible_target_reports_lowest_density():
    profile = random_profile(4)
    low = profile["density"].numpy().max(axis=1).min()  # here one rule is sparsest at every length
    assert lowest_density(profile) == pytest.approx(low)
    with pytest.raises(ValueError, match=f"lowest achievable mean density is {low:.4f}") as info:
        search(profile, low * 0.9)
    assert "\n" not in str(info.value)
    plan = search(profile, float(low))  # exactly at the bound is feasible
    check_plan(plan, profile, float(low), 2)


def test_lowest_density_with_length_tradeoff():
    # rule A is sparse at the short length, rule B at the long one: mixing heads beats any uniform plan
    rules = [Rule(0, 1), Rule(1, 0), Rule(2, 0)]
    dens = [[1.0, 1.0], [0.2, 0.6], [0.6, 0.2]]
    profile = make_profile(1, 2, rules, [16, 32], np.zeros((1, 2, 3, 2)), dens)
    assert lowest_density(profile) == pytest.approx(0.4)
    with pytest.raises(ValueError, match="0.4000"):
        search(profile, 0.39)
    plan = search(profile, 0.4)
    assert sorted(plan_choice(plan, profile)[0].tolist()) == [1, 2] and plan["summary"]["uniform"] is None
    assert "no uniform plan" in summarize(plan)


def test_bad_inputs():
    profile = random_profile(5)
    for bad in (0, 1.5, "0.5", True):
        with pytest.raises(ValueError, match="density"):
            search(profile, bad)
    with pytest.raises(ValueError, match="max_rules_per_layer"):
        search(profile, 0.5, max_rules_per_layer=0)
    broken = dict(profile, loss=profile["loss"][:, :, :-1])
    with pytest.raises(ValueError, match="loss has shape"):
        check_profile(broken)
    with pytest.raises(ValueError, match="format"):
        check_profile(dict(profile, format="x"))
    with pytest.raises(ValueError, match="missing key 'density'"):
        check_profile({k: v for k, v in profile.items() if k != "density"})


def test_nonconsecutive_layers_keep_their_indices():
    profile = random_profile(6, n_layers=2)
    profile["layers"] = [1, 3]
    plan = search(profile, 0.5)
    assert sorted(plan["layers"]) == ["1", "3"]
    assert head_windows(plan, 0, 128) is None and head_windows(plan, 3, 128).shape == (4,)


def test_cli_search_end_to_end(tmp_path, capsys):
    profile = random_profile(7)
    path = tmp_path / "profile.pt"
    torch.save(profile, path)
    out = tmp_path / "plans" / "plan.json"
    assert moa_main(["search", str(path), "--density", "0.5", "--out", str(out), "--max-rules-per-layer", "2"]) == 0
    plan = load_plan(out, n_layers=3, n_heads=4)
    check_plan(plan, profile, 0.5, 2)
    printed = capsys.readouterr().out
    assert "achieved density" in printed and str(out) in printed


def test_cli_errors(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        moa_main(["search", str(tmp_path / "missing.pt"), "--density", "0.5", "--out", str(tmp_path / "p.json")])
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a torch file")
    with pytest.raises(ConfigError, match="cannot be read") as info:
        moa_main(["search", str(junk), "--density", "0.5", "--out", str(tmp_path / "p.json")])
    assert "\n" not in str(info.value)
    wrong = tmp_path / "wrong.pt"
    torch.save({"format": "something-else"}, wrong)
    with pytest.raises(ConfigError, match="format"):
        moa_main(["search", str(wrong), "--density", "0.5", "--out", str(tmp_path / "p.json")])
    good = tmp_path / "good.pt"
    torch.save(random_profile(8), good)
    with pytest.raises(ConfigError, match="lowest achievable"):
        moa_main(["search", str(good), "--density", "0.01", "--out", str(tmp_path / "p.json")])
    for argv in (["search", str(good), "--density", "2", "--out", "x.json"], ["search", str(good)], ["nope"], []):
        with pytest.raises(ConfigError):
            moa_main(argv)
    assert not (tmp_path / "p.json").exists()
