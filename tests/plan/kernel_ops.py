"""Let a dispatch-mode measurement (flop counter, MemTracker) see inside the recurrent kernel ops.

The kernel ops are `torch.library` custom ops: a dispatch mode sees one call and runs it with itself popped, so
neither the matmuls nor the tensors allocated inside (the chunk matrices the op's backward recomputes) reach it.
Entered above such a mode, `IntoKernelOps` calls the recurrent ops' registered Python implementations (forward, and
the backward that recomputes the forward and differentiates it) in place of the opaque call, so their aten ops reach
the mode below, as their kernels' work and allocations reach the device and its allocator."""
from __future__ import annotations

from torch._library.custom_ops import _maybe_get_opdef
from torch.utils._python_dispatch import TorchDispatchMode

RECURRENT_OPS = ("gated_delta_rule", "linear_attention")
# every kernel op a training step runs on CPU (the fused attention's two ops and the opaque ops)
ALL_OPS = RECURRENT_OPS + ("attention_fwd", "attention_bwd", "local_attention", "landmark_attention",
                           "sf_attention", "taylor_linear_attention", "titans_linear_memory")


class IntoKernelOps(TorchDispatchMode):
    def __init__(self, ops: tuple = RECURRENT_OPS):
        super().__init__()
        self.ops = ops

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        opdef = _maybe_get_opdef(func) if func.namespace == "lctrain" else None
        if opdef is not None and (func._opname in self.ops or func._opname.removesuffix("_backward") in self.ops):
            return opdef._init_fn(*args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))
