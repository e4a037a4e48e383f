"""Helpers shared by the distributed test cases."""
from __future__ import annotations

import torch
import torch.distributed as dist

from tests.parallel import reference_ops

TOL = 1e-10


def kernel_ops():
    """(linear_attention, gated_delta_rule, backend): the project's ops with their float64 reference backend when
    the kernel package is importable, else the token-by-token references of this folder."""
    try:
        from lctrain.kernels import gated_delta_rule, linear_attention
        return linear_attention, gated_delta_rule, "naive"
    except ImportError:
        return reference_ops.linear_attention, reference_ops.gated_delta_rule, None


def packed_positions(rows: int, length: int, doc_lengths: list[list[int]]) -> torch.Tensor:
    """`[rows, length]` positions of documents packed back to back (the last one cut at `length`)."""
    out = torch.empty(rows, length, dtype=torch.long)
    for r in range(rows):
        pos = []
        for n in doc_lengths[r]:
            pos.extend(range(n))
        while len(pos) < length:
            pos.extend(range(length))
        out[r] = torch.tensor(pos[:length])
    return out


def all_sum(t: torch.Tensor) -> torch.Tensor:
    out = t.detach().clone()
    dist.all_reduce(out)
    return out


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str, tol: float = TOL) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    err = (actual - expected).abs().max().item()
    scale = max(1.0, expected.abs().max().item())
    assert err <= tol * scale, f"{what}: max abs error {err:.3e} > {tol * scale:.1e}"


def leaves(local: dict, keys) -> dict:
    """Detached float leaves requiring grad for `keys` of a sharded batch."""
    return {k: local[k].detach().clone().requires_grad_(True) for k in keys}
