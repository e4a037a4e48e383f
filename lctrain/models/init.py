"""Weight initialisation that does not depend on how, or in how many pieces, the model is built.

Each module draws its initial values from its own generator, seeded by (the model's init seed, the module's dotted
path). The values therefore do not depend on what the constructors drew before, nor on the order in which modules
are initialised, so a model built on the `meta` device and materialised one block at a time (the FSDP engine) gets
exactly the weights an eagerly built model gets for the same seed.

Rules (pre-norm transformer practice): Linear weights ~ N(0, std), the last projection of each residual branch
(`_is_residual_out`) ~ N(0, std / sqrt(2 * n_layers)), biases 0, embeddings ~ N(0, std), RMSNorm gains 1. A module
with its own special parameters defines `init_extra_()` (decay rates, gate biases, conv kernels); it runs after the
module's children, with the module's generator installed as torch's default CPU generator.
"""
from __future__ import annotations

import contextlib
import math
import zlib

import torch
import torch.nn as nn

from lctrain.models.blocks import RMSNorm


def module_seed(init_seed: int, path: str) -> int:
    """The generator seed of the module at dotted `path` (crc32: stable across processes and Python runs)."""
    return (init_seed * 1_000_003 + zlib.crc32(path.encode())) % 2**63


def init_module_tree_(module: nn.Module, prefix: str, init_seed: int, std: float, n_layers: int) -> None:
    """Initialise every parameter under `module` (whose dotted path in the model is `prefix`) in place.
    Parameters must be real CPU tensors (the seeded generators are CPU ones)."""
    out_std = std / math.sqrt(2 * n_layers)
    # Children before parents: a parent's init_extra_ may overwrite what a child's rule wrote (a gate bias).
    for path, sub in reversed(list(module.named_modules(prefix=prefix))):
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(module_seed(init_seed, path))
            if isinstance(sub, nn.Linear):
                sub.weight.normal_(0.0, out_std if getattr(sub, "_is_residual_out", False) else std)
                if sub.bias is not None:
                    sub.bias.zero_()
            elif isinstance(sub, nn.Embedding):
                sub.weight.normal_(0.0, std)
            elif isinstance(sub, RMSNorm):
                sub.weight.fill_(1.0)
            if path and hasattr(sub, "init_extra_"):
                sub.init_extra_()


@contextlib.contextmanager
def parameters_on_meta():
    """Build modules with their parameters on the `meta` device (no memory, no init) and their buffers real:
    buffers (rotary frequencies, decay slopes) are computed from the config and cost nothing, and an engine that
    materialises the parameters shard by shard cannot recompute them."""
    register = nn.Module.register_parameter

    def register_on_meta(self, name, param):
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)
        register(self, name, param)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register
