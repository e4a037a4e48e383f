"""Per-head output scales of freshly converted layers, fitted in closed form on one batch.

A converted layer reads the attention's q/k/v, but its per-head outputs have another scale (and, head by head,
possibly the opposite sign) than the attention's: a recurrent state sums where softmax averages, and the output
norm and gate rescale. For each converted layer and head h, the scale s_h minimising
||s_h * u_h - a_h||^2 over the batch (u: the new layer's input to its output projection, a: the attention's) is
<u_h, a_h> / <u_h, u_h>; it is folded into the output projection's columns of head h. The sums are reduced over
data-parallel ranks first, so every rank ends with the same weights.
"""
from __future__ import annotations

import torch


def _projection_inputs(mixer: torch.nn.Module, run) -> torch.Tensor:
    """What `mixer.o_proj` receives while `run()` executes."""
    seen = {}
    handle = mixer.o_proj.register_forward_hook(lambda module, args, output: seen.update(u=args[0].detach()))
    try:
        run()
    finally:
        handle.remove()
    return seen["u"]


@torch.no_grad()
def calibrate_output_scales(student, teacher, layers: list[int], input_ids: torch.Tensor, ctx,
                            reduce=lambda t: t) -> dict[int, torch.Tensor]:
    """Fit and apply the per-head scales for `layers`; returns them (layer -> `[H]`). `reduce` sums a tensor over
    ranks (identity in one process)."""
    captured = {}
    handles = []
    for i in layers:
        mixer = teacher.layers[i].mixer
        handles.append(mixer.register_forward_hook(
            lambda m, args, out, i=i: captured.__setitem__(i, args[0].detach())))
        handles.append(mixer.o_proj.register_forward_hook(
            lambda m, args, out, i=i: captured.__setitem__(("a", i), args[0].detach())))
    try:
        teacher(input_ids, ctx=ctx)
    finally:
        for h in handles:
            h.remove()
    scales = {}
    for i in layers:
        mixer = student.layers[i].mixer
        u = _projection_inputs(mixer, lambda: mixer(captured[i], ctx)).float()
        a = captured[("a", i)].float()
        heads = mixer.n_heads
        u = u.reshape(-1, heads, u.shape[-1] // heads)
        a = a.reshape(-1, heads, a.shape[-1] // heads)
        sums = reduce(torch.stack([(u * a).sum((0, 2)), (u * u).sum((0, 2))]).double())
        scale = (sums[0] / sums[1].clamp_min(1e-30)).to(mixer.o_proj.weight.dtype)
        mixer.o_proj.weight.mul_(scale.repeat_interleave(u.shape[-1])[None, :])
        scales[i] = scale
    return scales
