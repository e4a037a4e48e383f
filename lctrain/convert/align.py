"""Stage 1 of conversion: each new layer learns to reproduce the attention output it replaces.

The teacher runs on a training batch; for every converted layer its mixer's input (the normed residual stream)
and output are captured, the student's new mixer is applied to the same input, and the mean squared error of the
two outputs is minimised — only the new mixers' parameters train (LoLCATs' attention transfer, applied to Gated
DeltaNet and friends). Gradients are averaged over data-parallel ranks by hand, so no engine is involved.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


class _Capture:
    """Forward hooks keeping each watched mixer's (input, output)."""

    def __init__(self, mixers: dict[int, torch.nn.Module]):
        self.seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.handles = [m.register_forward_hook(self._hook(i)) for i, m in mixers.items()]

    def _hook(self, index: int):
        def keep(module, args, output):
            self.seen[index] = (args[0].detach(), output.detach())
        return keep

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def alignment_loss(student, teacher, layers: list[int], input_ids: torch.Tensor, ctx) -> torch.Tensor:
    """Mean over converted layers of the per-element MSE between the student's new mixer and the teacher's
    attention, both applied to the teacher's mixer input."""
    capture = _Capture({i: teacher.layers[i].mixer for i in layers})
    try:
        with torch.no_grad():
            teacher(input_ids, ctx=ctx)
    finally:
        capture.remove()
    losses = []
    for i in layers:
        x, target = capture.seen[i]
        out = student.layers[i].mixer(x, ctx)
        losses.append(torch.nn.functional.mse_loss(out.float(), target.float()))
    return torch.stack(losses).mean()


def align_layers(student, teacher, layers: list[int], next_batch, prepare, steps: int, lr: float, env,
                 autocast, on_step) -> None:
    """Run `steps` alignment steps. `next_batch()` gives a loader batch, `prepare(batch)` -> (inputs, ctx),
    `on_step(k, mse)` reports (rank 0 logs)."""
    params = [p for i in layers for p in student.layers[i].mixer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    for k in range(1, steps + 1):
        inputs, ctx = prepare(next_batch())
        with autocast():
            loss = alignment_loss(student, teacher, layers, inputs["input_ids"], ctx)
        loss.backward()
        value = loss.detach().double()
        if env.distributed:
            for p in params:
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad /= env.world_size
            dist.all_reduce(value)
            value /= env.world_size
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        on_step(k, value.item())
