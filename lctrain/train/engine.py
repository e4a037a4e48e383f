"""Training engines: how a step's gradients are reduced, clipped and applied, and how that state is saved.

The loop talks to one small interface, so it reads the same for both engines:

    engine.model                  what forward is called on (DDP wrapper, DeepSpeed engine or the bare model)
    engine.eval_model             what evaluation calls; engine.eval_shares_batches: DP ranks split the batches
    with engine.micro_step(last): forward, then engine.backward(loss_sum, scale)
    grad_norm, applied = engine.step(loss)
    engine.lr, engine.scheduler
    engine.save(ckpt, step, trainer_state, data_state, config_yaml, barrier) / engine.load(ckpt, path)

`backward` receives the loss *sum* of a micro-batch and the factor world / (target tokens of the whole step), so
after the engine's mean over data-parallel ranks the gradient is exactly d(sum of losses)/d(params) / n_targets.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from lctrain.config import ConfigError
from lctrain.train.optim import build_optimizer, build_scheduler, clip_and_step


def build_engine(module: torch.nn.Module, cfg, env, layout):
    if cfg.train.engine == "deepspeed":
        from lctrain.train.deepspeed_engine import DeepSpeedEngine
        return DeepSpeedEngine(module, cfg, env, layout)
    if cfg.train.engine == "fsdp":
        from lctrain.train.fsdp_engine import FSDPEngine
        return FSDPEngine(module, cfg, env, layout)
    return DDPEngine(module, cfg, env)


class DDPEngine:
    """torch DistributedDataParallel (or one process): AdamW, clipping, non-finite steps skipped."""

    name = "ddp"

    def __init__(self, module: torch.nn.Module, cfg, env):
        self.module, self.cfg, self.env = module, cfg, env
        self.optimizer = build_optimizer(module, cfg.train)
        self.scheduler = build_scheduler(self.optimizer, cfg.train)
        self.model = module
        if env.distributed:
            self.model = torch.nn.parallel.DistributedDataParallel(
                module, device_ids=[env.device.index] if env.device.type == "cuda" else None)
        self.params = [p for p in module.parameters() if p.requires_grad]
        # Evaluation runs on the bare model: DDP's forward would broadcast buffers, a collective that ranks with
        # different numbers of evaluation batches would not all reach.
        self.eval_model = module
        self.eval_shares_batches = True

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def micro_step(self, last: bool):
        """Gradients are all-reduced only on the last micro-batch of a step."""
        if last or not self.env.distributed:
            return contextlib.nullcontext()
        return self.model.no_sync()

    def backward(self, loss_sum: torch.Tensor, scale: float) -> None:
        (loss_sum * scale).backward()

    def step(self, loss: float) -> tuple[float, bool]:
        return clip_and_step(self.params, self.optimizer, self.scheduler, self.cfg.train.grad_clip, loss)

    def save(self, ckpt, step: int, trainer_state: dict, data_state: dict, config_yaml: str, barrier) -> Path:
        return ckpt.save(step, self.module, self.optimizer, trainer_state, data_state, config_yaml, barrier)

    def load(self, ckpt, path: Path) -> tuple[dict, dict]:
        if not (path / "optimizer.pt").is_file() and (path / "deepspeed").is_dir():
            raise ConfigError(f"checkpoint {path} was written by the deepspeed engine; resume with "
                              "train.engine=deepspeed (or start a new run with checkpoint.init_from)")
        return ckpt.load(path, self.module, self.optimizer)
