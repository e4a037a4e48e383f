"""Kernel ops as `torch.library` custom ops in the `lctrain` namespace, opaque to `torch.compile`.

Each op is registered twice: `lctrain::<name>` (the forward) and `lctrain::<name>_backward`, tied together with
`register_autograd`, and each gets a fake (shape-only) implementation. The compiler sees one node per op call: no
graph break on the host-side reads inside (chunk tables, document counts, `.tolist()` of the host offsets), no
value guard on the document boundaries (they arrive as a CPU tensor argument, so a new batch layout reuses the
compiled graph), and no recompilation when the Triton launch path changes.

The backward op recomputes the forward under autograd and differentiates it (`torch.autograd.grad`): each op's
implementation (Triton `autograd.Function` or chunked PyTorch) stays the single source of both passes, at the cost
of one extra forward of the op in the backward (the same trade activation checkpointing makes for the whole block).
Called eagerly inside `kernel_recompute(False)` (`model.kernel_recompute: false`), the function returned here skips
the op and runs the implementation directly under autograd: no recompute, the same arithmetic, but the
implementation's own saved tensors (chunk matrices, states) stay alive until backward. Under torch.compile the op
is always used.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Sequence

import torch

NAMESPACE = "lctrain"
_RECOMPUTE = [True]  # eager calls go through the op (recompute in backward) unless kernel_recompute(False)


@contextmanager
def kernel_recompute(enabled: bool):
    """Within: eager kernel-op calls recompute their forward in backward (True, the default: less memory) or run
    their implementation directly under autograd (False: no recompute, its saved tensors kept)."""
    previous = _RECOMPUTE[0]
    _RECOMPUTE[0] = bool(enabled)
    try:
        yield
    finally:
        _RECOMPUTE[0] = previous


def _parse(signature: str) -> tuple[list[str], list[str]]:
    types, names = [], []
    for part in signature.split(","):
        kind, name = part.split()
        types.append(kind)
        names.append(name)
    return types, names


def _device_of(args) -> torch.device:
    for a in args:
        if isinstance(a, torch.Tensor) and a.device.type != "cpu":
            return a.device
    return torch.device("cpu")


def _placeholder(args) -> torch.Tensor:
    """The output standing in for None (a custom op returns tensors only)."""
    return torch.empty(0, dtype=torch.float32, device=_device_of(args))


def _fresh(outputs: Sequence[torch.Tensor], inputs) -> list[torch.Tensor]:
    """Custom ops may not return an input or two views of one buffer: clone where storage is shared."""
    seen = {a.untyped_storage().data_ptr() for a in inputs if isinstance(a, torch.Tensor) and a.numel()}
    fresh = []
    for out in outputs:
        ptr = out.untyped_storage().data_ptr() if out.numel() else None
        if ptr is not None and ptr in seen:
            out = out.clone()
            ptr = out.untyped_storage().data_ptr()
        if ptr is not None:
            seen.add(ptr)
        fresh.append(out)
    return fresh


def _autograd_dispatch():
    """Re-enable autograd dispatch inside an op's implementation (the dispatcher runs custom-op kernels below
    the autograd keys), so the backward can differentiate its recomputed forward."""
    keys = torch._C.DispatchKey
    exclude = torch._C._dispatch_tls_local_exclude_set()
    for key in (keys.AutogradFunctionality, keys.AutogradOther, keys.AutogradNestedTensor, keys.ADInplaceOrView):
        exclude = exclude.remove(key)
    return torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude)


def opaque_op(name: str, signature: str, differentiable: Sequence[str], num_outputs: int,
              run: Callable, fake: Callable) -> Callable:
    """Register `lctrain::<name>` and its backward; return a function of the op's positional arguments that gives
    a tuple of `num_outputs` tensors: the op, or the implementation itself when called eagerly inside
    `kernel_recompute(False)`. The registered op is the function's `.op`.

    signature: the op's arguments in schema syntax, e.g. "Tensor q, Tensor? cu_seqlens, float scale, str backend".
    differentiable: names of the tensor arguments that receive gradients.
    run(*args): the differentiable implementation; returns `num_outputs` tensors or None (None becomes an empty
        placeholder tensor, which callers map back to None).
    fake(*args): `num_outputs` empty tensors of the output shapes and dtypes (placeholders where run gives None).
    """
    types, names = _parse(signature)
    grad_index = [names.index(n) for n in differentiable]
    tensor_index = [i for i, t in enumerate(types) if t.startswith("Tensor")]
    outs = "Tensor" if num_outputs == 1 else "(" + ", ".join(["Tensor"] * num_outputs) + ")"
    qualified = f"{NAMESPACE}::{name}"

    def forward_impl(*args):
        with torch.no_grad():  # the backward recomputes; nothing here needs a graph
            outputs = run(*args)
        # Contiguous outputs: the fake implementation promises dense strides.
        fresh = _fresh([o.contiguous() if o is not None else _placeholder(args) for o in outputs], args)
        return fresh[0] if num_outputs == 1 else tuple(fresh)

    def backward_impl(*args):
        *args, grads, needs = args
        args = list(args)
        leaves = []
        with _autograd_dispatch(), torch.enable_grad():
            for i, need in zip(grad_index, needs):
                if need and args[i] is not None:
                    args[i] = args[i].detach().requires_grad_(True)
                    leaves.append(i)
            outputs = run(*args)
            pairs = [(o, g) for o, g in zip(outputs, grads)
                     if o is not None and g is not None and o.requires_grad and o.numel()]
            got = [None] * len(leaves)
            if pairs and leaves:
                got = list(torch.autograd.grad([o for o, _ in pairs], [args[i] for i in leaves],
                                               [g.to(o.dtype) for o, g in pairs], allow_unused=True))
        by_index = dict(zip(leaves, got))
        result = []
        for i in grad_index:
            if i in by_index:
                grad = by_index[i]
                result.append(torch.zeros(args[i].shape, dtype=args[i].dtype, device=args[i].device) if grad is None
                              else grad.detach().contiguous())
            else:
                result.append(_placeholder(args))
        return _fresh(result, list(args) + [g for g in grads if g is not None])

    fwd = torch.library.custom_op(qualified, forward_impl, mutates_args=(), schema=f"({signature}) -> {outs}")
    bwd = torch.library.custom_op(f"{qualified}_backward", backward_impl, mutates_args=(),
                                  schema=f"({signature}, Tensor?[] grads, bool[] needs) -> Tensor[]")

    @fwd.register_fake
    def _(*args):
        outputs = fake(*args)
        return outputs[0] if num_outputs == 1 else tuple(outputs)

    @bwd.register_fake
    def _(*args):
        *args, _grads, needs = args
        return [args[i].new_empty(args[i].shape) if need and args[i] is not None else _placeholder(args)
                for i, need in zip(grad_index, needs)]

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*(inputs[i] for i in tensor_index))
        ctx.constants = {i: inputs[i] for i in range(len(names)) if i not in tensor_index}

    def backward(ctx, *grads):
        args = [None] * len(names)
        for i, t in zip(tensor_index, ctx.saved_tensors):
            args[i] = t
        for i, value in ctx.constants.items():
            args[i] = value
        needs = [bool(ctx.needs_input_grad[i]) and args[i] is not None for i in grad_index]
        result = [None] * len(names)
        if not any(needs):
            return tuple(result)
        grads_in = bwd(*args, list(grads), needs)
        for k, (i, need) in enumerate(zip(grad_index, needs)):
            if need:
                result[i] = grads_in[k]
        return tuple(result)

    fwd.register_autograd(backward, setup_context=setup_context)

    def call(*args):
        if torch.compiler.is_compiling() or _RECOMPUTE[0]:
            out = fwd(*args)
            return (out,) if num_outputs == 1 else out
        # The implementation's own autograd, no recompute in backward. Dense outputs and placeholders for None,
        # as the op returns them.
        return tuple(o.contiguous() if o is not None else _placeholder(args) for o in run(*args))

    call.op = fwd  # the registered op itself (for opcheck and the compiled path)
    return call


def recurrent_fake(q: torch.Tensor, v: torch.Tensor, cu_seqlens_cpu, output_final_state: bool, backend: str,
                   state_rows: int, state_cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Fake outputs of a recurrent op: o `[B, T, H, V]` and the final state `[N, H, rows, cols]` (fp32; float64 for a
    float64 input off Triton), or an empty placeholder when no state is asked for. N comes from the host offsets."""
    batch, length, heads = q.shape[:3]
    o = q.new_empty(batch, length, heads, v.shape[-1])
    if not output_final_state:
        return o, q.new_empty(0, dtype=torch.float32)
    num_seqs = batch if cu_seqlens_cpu is None else cu_seqlens_cpu.shape[0] - 1
    state_dtype = torch.float64 if q.dtype == torch.float64 and backend != "triton" else torch.float32
    return o, q.new_empty(num_seqs, heads, state_rows, state_cols, dtype=state_dtype)


def none_if_empty(t: torch.Tensor) -> torch.Tensor | None:
    """Map an op's placeholder output back to None."""
    return None if t.numel() == 0 and t.dim() == 1 else t
