"""Pick one elastic rule per attention head by a mixed-integer linear program over a loss profile.

Variables: binary x[l, h, r] (head h of layer l uses rule r) and binary y[l, r] (layer l uses rule r).

    minimise    sum_{l,h,r} x[l,h,r] * sum_n loss[l,h,r,n]
    subject to  sum_r x[l,h,r] = 1                                   every head gets one rule
                x[l,h,r] <= y[l,r],  sum_r y[l,r] <= max_rules       at most max_rules distinct rules per layer
                sum_{l,h,r} density[r,n] * x[l,h,r] <= target * L * H    mean density at every profiled length n

solved with `scipy.optimize.milp` (HiGHS branch and bound).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from lctrain.moa.plan import PLAN_FORMAT, PLAN_VERSION, head_rules, validate_plan
from lctrain.moa.profile import PROFILE_FORMAT, PROFILE_VERSION
from lctrain.moa.rules import Rule

__all__ = ["PROFILE_FORMAT", "PROFILE_VERSION", "check_profile", "search", "summarize", "lowest_density"]

_TOL = 1e-9  # density slack accepted as floating-point noise


def _array(value, name: str) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", torch.float64).numpy()
    try:
        return np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"moa profile: {name} is not a numeric array") from None


def check_profile(profile) -> dict:
    """Validate a profile dict; return its parts as plain Python / numpy. Raises a one-line ValueError."""
    if not isinstance(profile, dict):
        raise ValueError(f"moa profile: expected a dict, got {type(profile).__name__}")
    if profile.get("format") != PROFILE_FORMAT:
        raise ValueError(f"moa profile: format is {profile.get('format')!r}, expected {PROFILE_FORMAT!r}")
    if profile.get("version") != PROFILE_VERSION:
        raise ValueError(f"moa profile: version {profile.get('version')!r} is not supported")
    for key in ("rules", "sink", "lengths", "layers", "n_heads", "loss", "density"):
        if key not in profile:
            raise ValueError(f"moa profile: missing key {key!r}")
    try:
        rules = [Rule(float(a), float(b)) for a, b in profile["rules"]]
        lengths = [int(n) for n in profile["lengths"]]
        layers = [int(i) for i in profile["layers"]]
        heads, sink = int(profile["n_heads"]), int(profile["sink"])
    except (TypeError, ValueError):
        raise ValueError("moa profile: rules / lengths / layers / n_heads / sink are malformed") from None
    if not rules or not lengths or not layers or heads < 1 or sink < 0:
        raise ValueError(f"moa profile: needs >= 1 rule, length, layer and head and sink >= 0; got {len(rules)} "
                         f"rules, {len(lengths)} lengths, {len(layers)} layers, {heads} heads, sink {sink}")
    if any(r.alpha < 0 or r.beta < 0 or not math.isfinite(r.alpha + r.beta) for r in rules):
        raise ValueError("moa profile: rule alpha / beta must be finite and >= 0")
    if any(n < 1 for n in lengths) or len(set(layers)) != len(layers) or min(layers) < 0:
        raise ValueError(f"moa profile: bad lengths {lengths} or layers {layers}")
    loss, dens = _array(profile["loss"], "loss"), _array(profile["density"], "density")
    want = (len(layers), heads, len(rules), len(lengths))
    if loss.shape != want:
        raise ValueError(f"moa profile: loss has shape {list(loss.shape)}, expected [L, H, R, lengths] = {list(want)}")
    if dens.shape != (len(rules), len(lengths)):
        raise ValueError(f"moa profile: density has shape {list(dens.shape)}, expected [R, lengths] = "
                         f"{[len(rules), len(lengths)]}")
    if not np.isfinite(loss).all() or not np.isfinite(dens).all():
        raise ValueError("moa profile: loss and density must be finite")
    if (dens < 0).any() or (dens > 1 + 1e-12).any():
        raise ValueError("moa profile: density values must lie in [0, 1]")
    return {"rules": rules, "lengths": lengths, "layers": layers, "n_heads": heads, "sink": sink,
            "loss": loss, "density": dens, "num_docs": profile.get("num_docs"), "source": profile.get("source")}


def _build(cost: np.ndarray, dens: np.ndarray, n_layers: int, heads: int, k: int, rhs: np.ndarray | None):
    """Sparse constraint blocks of the MILP. Returns (c, constraints, n_x). `rhs` None: minimise max density."""
    from scipy.optimize import LinearConstraint
    from scipy.sparse import coo_array, csr_array, hstack

    n_rules, n_len = dens.shape
    n_x = n_layers * heads * n_rules
    use_y = k < n_rules
    n_y = n_layers * n_rules if use_y else 0
    n_t = 1 if rhs is None else 0  # free variable t for the min-max-density problem
    n_var = n_x + n_y + n_t
    rows = []
    # one rule per head
    idx = np.arange(n_x)
    a = coo_array((np.ones(n_x), (idx // n_rules, idx)), shape=(n_layers * heads, n_var))
    rows.append(LinearConstraint(csr_array(a), 1, 1))
    if use_y:
        # x[l,h,r] - y[l,r] <= 0
        lay, r = idx // (heads * n_rules), idx % n_rules
        y_col = n_x + lay * n_rules + r
        a = coo_array((np.concatenate([np.ones(n_x), -np.ones(n_x)]),
                       (np.concatenate([idx, idx]), np.concatenate([idx, y_col]))), shape=(n_x, n_var))
        rows.append(LinearConstraint(csr_array(a), -np.inf, 0))
        # sum_r y[l,r] <= k
        yi = np.arange(n_y)
        a = coo_array((np.ones(n_y), (yi // n_rules, n_x + yi)), shape=(n_layers, n_var))
        rows.append(LinearConstraint(csr_array(a), -np.inf, k))
    # density at each length: sum d[r,n] x <= rhs[n]   (or <= t * L * H)
    d_block = np.tile(dens.T, (1, n_layers * heads))  # [n_len, n_x], column (l,h,r) -> d[r, n]
    blocks = [csr_array(d_block), csr_array((n_len, n_y))]
    if rhs is None:
        blocks.append(csr_array(-float(n_layers * heads) * np.ones((n_len, 1))))
        rows.append(LinearConstraint(hstack(blocks, format="csr"), -np.inf, 0))
    else:
        rows.append(LinearConstraint(hstack(blocks, format="csr"), -np.inf, rhs))
    c = np.zeros(n_var)
    if rhs is None:
        c[-1] = 1.0
    else:
        c[:n_x] = cost.reshape(-1)
    return c, rows, n_x, n_var, n_t


def _solve(c, rows, n_var, n_t, time_limit, mip_rel_gap):
    from scipy.optimize import Bounds, milp

    integrality = np.ones(n_var)
    lb, ub = np.zeros(n_var), np.ones(n_var)
    if n_t:
        integrality[-1], ub[-1] = 0, np.inf
    options = {"mip_rel_gap": mip_rel_gap, "disp": False}
    if time_limit is not None:
        options["time_limit"] = float(time_limit)
    return milp(c, integrality=integrality, bounds=Bounds(lb, ub), constraints=rows, options=options)


def lowest_density(profile: dict, max_rules_per_layer: int = 2, time_limit: float | None = 60.0) -> float:
    """The smallest target density any plan can meet (max over lengths of the mean head density, minimised)."""
    p = check_profile(profile)
    dens, n_layers, heads = p["density"], len(p["layers"]), p["n_heads"]
    # a uniform plan with the rule that is sparsest in the worst length is optimal unless rules trade off by length
    best_uniform = float(dens.max(axis=1).min())
    if dens.shape[1] == 1 or np.allclose(dens.max(axis=1).min(), dens.min(axis=0).max()):
        return best_uniform
    c, rows, _, n_var, n_t = _build(np.zeros(0), dens, n_layers, heads, max_rules_per_layer, None)
    res = _solve(c, rows, n_var, n_t, time_limit, 1e-6)
    return float(res.fun) if res.x is not None else best_uniform


def _assignment_stats(choice: np.ndarray, loss: np.ndarray, dens: np.ndarray):
    """choice [L, H] rule indices -> (total loss, mean density per length [n_len])."""
    n_layers, heads = choice.shape
    picked = np.take_along_axis(loss, choice[:, :, None, None], axis=2)[:, :, 0, :]  # [L, H, n_len]
    return float(picked.sum()), dens[choice.reshape(-1)].mean(axis=0)


def search(profile: dict, density: float, max_rules_per_layer: int = 2, time_limit: float | None = 600.0,
           mip_rel_gap: float = 1e-6) -> dict:
    """Solve the MoA rule-assignment MILP for `profile` under a mean-density budget `density` at every length.

    Returns a plan dict (see `lctrain.moa.plan`) whose summary holds the rules and head counts per layer, the
    achieved density per length, the total profiled loss and the best feasible uniform plan for comparison.
    Raises ValueError when no plan meets the budget (the message gives the lowest achievable density).
    """
    p = check_profile(profile)
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 < density <= 1:
        raise ValueError(f"moa search: density must be a number in (0, 1], got {density!r}")
    if isinstance(max_rules_per_layer, bool) or not isinstance(max_rules_per_layer, int) or max_rules_per_layer < 1:
        raise ValueError(f"moa search: max_rules_per_layer must be an integer >= 1, got {max_rules_per_layer!r}")
    rules, lengths, layers, heads = p["rules"], p["lengths"], p["layers"], p["n_heads"]
    loss, dens = p["loss"], p["density"]
    n_layers, n_rules = len(layers), len(rules)
    cost = loss.sum(axis=3)  # [L, H, R]
    target = float(density)

    # best uniform plan (one rule everywhere) meeting the budget: the comparison point and a fallback
    uniform = None
    feasible_uniform = np.nonzero((dens <= target + _TOL).all(axis=1))[0]
    if len(feasible_uniform):
        totals = cost.sum(axis=(0, 1))
        r = int(feasible_uniform[np.argmin(totals[feasible_uniform])])
        uniform = {"rule": rules[r].as_list(), "loss": float(totals[r]), "density": dens[r].tolist()}

    total_heads = n_layers * heads
    rhs = np.full(len(lengths), target * total_heads)
    c, rows, n_x, n_var, n_t = _build(cost, dens, n_layers, heads, max_rules_per_layer, rhs)
    choice, status, slipped = None, None, None
    for _ in range(3):  # re-solve with a tighter budget if the solver's feasibility tolerance let density slip
        res = _solve(c, rows, n_var, n_t, time_limit, mip_rel_gap)
        status = res.message
        if res.x is None:
            break
        x = res.x[:n_x].reshape(n_layers, heads, n_rules)
        cand = x.argmax(axis=2)
        achieved = _assignment_stats(cand, loss, dens)[1]
        excess = float((achieved - target).max())
        if excess <= _TOL:
            choice = cand
            break
        slipped = cand if excess <= 1e-6 else slipped
        rows[-1] = type(rows[-1])(rows[-1].A, -np.inf, rows[-1].ub - (excess + _TOL) * total_heads)
    if choice is None and slipped is not None:
        choice = slipped  # within the solver's tolerance of the budget; tightening made it infeasible
    if choice is None and uniform is None:
        low = lowest_density(profile, max_rules_per_layer, time_limit=60.0)
        raise ValueError(f"moa search: no plan meets density {target:g} at lengths {lengths}; the lowest achievable "
                         f"mean density is {low:.4f} (raise --density or profile sparser rules)")
    optimal = choice is not None and res.status == 0
    if choice is not None:
        total, achieved = _assignment_stats(choice, loss, dens)
    if choice is None or (uniform is not None and uniform["loss"] < total):
        # the solver stopped early (time limit) with something worse than the uniform plan: use the uniform plan
        r = next(i for i, rule in enumerate(rules) if rule.as_list() == uniform["rule"])
        choice = np.full((n_layers, heads), r)
        total, achieved = _assignment_stats(choice, loss, dens)
        optimal, status = False, f"{status} (fell back to the best uniform plan)"

    plan_layers, summary_layers = {}, {}
    for li, layer in enumerate(layers):
        plan_layers[str(layer)] = [rules[int(r)].as_list() for r in choice[li]]
        counts = np.bincount(choice[li], minlength=n_rules)
        summary_layers[str(layer)] = [{"alpha": rules[r].alpha, "beta": rules[r].beta, "heads": int(counts[r])}
                                      for r in np.nonzero(counts)[0]]
    summary = {
        "solver": "scipy.optimize.milp (HiGHS)", "status": str(status), "optimal": bool(optimal),
        "max_rules_per_layer": max_rules_per_layer, "layers": summary_layers,
        "achieved_density": [float(v) for v in achieved], "total_loss": total, "uniform": uniform,
        "num_docs": p["num_docs"], "source": p["source"],
    }
    plan = {"format": PLAN_FORMAT, "version": PLAN_VERSION, "sink": p["sink"], "n_heads": heads,
            "layers": plan_layers, "density": target, "lengths": lengths, "summary": summary}
    return validate_plan(plan, "moa search result")


def summarize(plan: dict) -> str:
    """A readable table of a plan: per layer the rules used with head counts, then density and loss totals."""
    s = plan.get("summary") or {}
    lengths = plan.get("lengths") or []
    out = [f"MoA plan: {len(plan['layers'])} layers x {plan['n_heads']} heads, sink {plan['sink']}, "
           f"rule = window alpha + beta*N"]
    if plan.get("density") is not None:
        out.append(f"target density {plan['density']:g}" + (f" at lengths {lengths}" if lengths else ""))
    out.append(f"{'layer':>5}  rules (heads)" + ("" if not lengths else
                                                 "  " + "  ".join(f"{'w@' + str(n):>8}" for n in lengths[:3])))
    for key in sorted(plan["layers"], key=int):
        rules = head_rules(plan, int(key))
        uniq = sorted(set(rules), key=lambda r: (r.beta, r.alpha))
        text = ", ".join(f"{r} x{sum(1 for q in rules if q == r)}" for r in uniq)
        windows = ""
        if lengths:  # range of head windows at up to three profiled lengths
            parts = []
            for n in lengths[:3]:
                ws = [r.window(n) for r in rules]
                parts.append(f"{min(ws)}-{max(ws)}" if min(ws) != max(ws) else str(ws[0]))
            windows = "  " + "  ".join(f"{w:>8}" for w in parts)
        out.append(f"{key:>5}  {text}{windows}")
    if s.get("achieved_density"):
        out.append("achieved density: " + ", ".join(f"N={n}: {d:.4f}" for n, d in zip(lengths, s["achieved_density"])))
    if "total_loss" in s:
        line = f"profiled loss: {s['total_loss']:.6g}"
        u = s.get("uniform")
        if u:
            line += f"   best uniform plan ({Rule(*u['rule'])} on every head): {u['loss']:.6g}"
        else:
            line += "   (no uniform plan meets the budget)"
        out.append(line)
    if s.get("status"):
        out.append(f"solver: {s.get('solver', '')} - {s['status']}" + ("" if s.get("optimal", True) else
                                                                        " [not proven optimal]"))
    return "\n".join(out)
