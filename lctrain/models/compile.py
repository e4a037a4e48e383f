"""`model.compile: true`: compile every block of the model with `torch.compile`, one graph per block.

Per-block compilation (as torchtitan does) keeps compile time proportional to one block of each kind rather than to
the whole model, composes with activation checkpointing (the checkpoint wraps the compiled block), DDP (gradient
hooks stay on the parameters) and sequence parallelism (collectives run inside the kernel ops, which are opaque
`lctrain::` custom ops to the compiler). Blocks are compiled in place (`nn.Module.compile`), so parameter names,
checkpoints and exports are unchanged.

Graphs are dynamic in the document layout: the ops take the batch's boundaries as a host tensor argument, so a new
packing of documents reuses the compiled graph. The attention mixer's single-document test is still a graph break
(a blocked, not failed, compile), so blocks compile with `fullgraph=False`.
"""
from __future__ import annotations

import time

import torch

BACKENDS = ("inductor", "aot_eager", "eager")


def compile_blocks(model: torch.nn.Module, backend: str = "inductor") -> "CompileReport":
    """Compile each block of `model.layers` in place; return the report to print after the first step."""
    if backend not in BACKENDS:
        raise ValueError(f"model.compile_backend: {backend!r} is not one of {BACKENDS}")
    for layer in model.layers:
        layer.compile(backend=backend, fullgraph=False)
    report = CompileReport(len(model.layers), backend)
    handle = None

    def start(*_):  # the clock starts at the first block's first call, not at model construction
        report.last = time.perf_counter()
        handle.remove()

    handle = model.layers[0].register_forward_pre_hook(start)
    return report


class CompileReport:
    """Compilation happens lazily inside the first step (every block's forward, then its backward). The first
    step's wall time minus the second's is the compile time; printed once, after the second step (or after the
    first when the run has one step)."""

    def __init__(self, blocks: int, backend: str):
        self.blocks, self.backend = blocks, backend
        self.last = time.perf_counter()
        self.steps: list[float] = []
        self.done = False

    def after_step(self, write, last: bool = False) -> None:
        now = time.perf_counter()
        self.steps.append(now - self.last)
        self.last = now
        if self.done or (len(self.steps) < 2 and not last):
            return
        self.done = True
        first = self.steps[0]
        compiling = first - self.steps[1] if len(self.steps) > 1 else first
        write(f"model.compile: {self.blocks} blocks compiled ({self.backend}) in ~{compiling:.1f}s "
              f"(first step {first:.1f}s" + (f", second {self.steps[1]:.2f}s)" if len(self.steps) > 1 else ")"))
