"""bench/peers.py pieces the GPU check's smoke run does not reach: the floor row's GDN stand-in (no GDN op runs,
every projection still gets its gradient, the real op comes back afterwards) and the one-line refusal of a pattern
without a peer."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
peers = pytest.importorskip("bench.peers")


def _loss(model):
    ids = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(0))
    labels = torch.full_like(ids, -100)
    labels[:, :-1] = ids[:, 1:]
    return peers._lctrain_loss(model, ids, labels)


def test_floor_stand_in_skips_the_gdn_op_and_keeps_every_gradient(monkeypatch):
    from lctrain import kernels
    from lctrain.models.mixers import gated_deltanet

    shapes = {**peers.SMOKE_SHAPES, "d_model": 32, "n_heads": 2, "head_dim": 16, "ffn_dim": 64, "vocab_size": 64}
    torch.manual_seed(0)
    model = peers.lctrain_model("GGGA", shapes, kernel_recompute=False)
    real = gated_deltanet.run_linear_op

    def no_op_may_run(*args, **kwargs):
        raise AssertionError("the GDN op ran under the stand-in")

    monkeypatch.setattr(kernels, "gated_delta_rule", no_op_may_run)
    with peers.gdn_op_free():
        free_loss = _loss(model)
        free_loss.backward()
    assert gated_deltanet.run_linear_op is real
    gdn = model.layers[0].mixer
    for name in ("q_proj", "k_proj", "v_proj", "a_proj", "b_proj", "g_proj", "o_proj"):
        grad = getattr(gdn, name).weight.grad
        assert grad is not None and torch.isfinite(grad).all(), name
    assert float(gdn.v_proj.weight.grad.abs().sum()) > 0  # o = v: the values carry the gradient
    monkeypatch.undo()
    model.zero_grad()
    loss = _loss(model)  # the real op again
    loss.backward()
    assert float(loss.detach()) != float(free_loss.detach()) and float(gdn.q_proj.weight.grad.abs().sum()) > 0


def test_a_pattern_without_a_peer_is_one_line_exit_2():
    proc = subprocess.run([sys.executable, "bench/peers.py", "--patterns", "A,XYZ,op:0,op:2048"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "XYZ,op:0 has no peer" in proc.stderr and "op:<T>" in proc.stderr, proc.stderr
