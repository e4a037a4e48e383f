"""`train.engine: deepspeed` — ZeRO 0-3 (optionally offloaded) around lctrain's own AdamW and schedule.

lctrain passes its torch AdamW (weight-decay groups from `build_optimizer`) and LambdaLR to `deepspeed.initialize`,
so DeepSpeed builds no fused-Adam extension. The batch triad (train_batch_size = micro_batch_size x
gradient_accumulation_steps x world) and gradient clipping are derived from `train.*`, so they cannot disagree
with the loop. DeepSpeed counts micro-batches in `step()`: it is called after every micro-batch and only updates
the weights on the last one.

Differences from the DDP engine: a non-finite step is still counted (and aborts after train.max_bad_steps), but
DeepSpeed applies it (it skips only fp16 overflow steps). Checkpoints keep lctrain's layout; DeepSpeed's own
files (ZeRO partitions per rank) go into `step-N/deepspeed/` inside the same temp-dir-then-rename save.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors.torch import save_file

from lctrain.config import ConfigError, DeepSpeedConfig
from lctrain.train.checkpoint import _model_tensors
from lctrain.train.optim import build_optimizer, build_scheduler

TAG = "deepspeed"  # the sub-directory of a checkpoint holding DeepSpeed's files


def expected_accelerator(device: torch.device) -> str:
    """`cuda` or `cpu` for DS_ACCELERATOR, from the device this process actually got. GPUs that are present but
    unusable are an error, never a quiet fall-back to CPU training (DS_ACCELERATOR=cpu opts in to CPU)."""
    if device.type == "cuda":
        return "cuda"
    chosen = os.environ.get("DS_ACCELERATOR")
    if chosen == "cuda" or (chosen != "cpu" and Path("/dev/nvidia0").exists()):
        raise RuntimeError("GPUs are expected but CUDA is not usable by torch (check the driver and the torch "
                           "build); set DS_ACCELERATOR=cpu to train on the CPU on purpose")
    return "cpu"


def import_deepspeed(device: torch.device):
    """Import deepspeed with DS_ACCELERATOR pinned to this process's device (DeepSpeed would otherwise guess)."""
    want = expected_accelerator(device)
    chosen = os.environ.get("DS_ACCELERATOR")
    if chosen and chosen != want:
        raise ConfigError(f"DS_ACCELERATOR={chosen} but this process trains on {device}; unset it or set "
                          f"DS_ACCELERATOR={want}")
    os.environ["DS_ACCELERATOR"] = want  # explicit, so DeepSpeed never picks an accelerator on its own
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() != want:
        raise RuntimeError(f"deepspeed was already imported with the {get_accelerator().device_name()!r} "
                           f"accelerator; this process trains on {device}")
    return deepspeed


def _recipe_overrides(ds: DeepSpeedConfig) -> set[str]:
    """deepspeed.* keys the recipe set away from their defaults (those win over a `deepspeed.config` file)."""
    default = DeepSpeedConfig()
    return {f.name for f in dataclasses.fields(ds) if getattr(ds, f.name) != getattr(default, f.name)}


def deepspeed_config(cfg, layout, on_cuda: bool) -> dict:
    """The JSON-like config handed to deepspeed.initialize."""
    ds = cfg.deepspeed
    base = {}
    if ds.config:
        try:
            base = json.loads(Path(ds.config).read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"deepspeed.config: {ds.config} is not valid JSON ({exc.msg} at line {exc.lineno})") \
                from None
    for key in ("optimizer", "scheduler"):
        if key in base:
            raise ConfigError(f"deepspeed.config: {ds.config} has an {key!r} section; lctrain passes its own "
                              f"(set it with train.*), remove the section")
    derived = {
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch_size,
        "gradient_accumulation_steps": layout.grad_accum,
        "train_batch_size": cfg.train.micro_batch_size * layout.grad_accum * layout.world,
        "gradient_clipping": float(cfg.train.grad_clip),
    }
    for key, value in derived.items():
        if key in base and base[key] != value:
            raise ConfigError(f"deepspeed.config: {ds.config} sets {key}={base[key]!r}, but the recipe implies "
                              f"{value!r} (from train.micro_batch_size / tokens_per_step / grad_clip); remove it")
    explicit = _recipe_overrides(ds) if ds.config else {f.name for f in dataclasses.fields(ds)}
    zero = dict(base.get("zero_optimization", {}))
    zero_keys = {"zero_stage": "stage", "reduce_bucket_size": "reduce_bucket_size",
                 "allgather_bucket_size": "allgather_bucket_size", "overlap_comm": "overlap_comm"}
    for name, key in zero_keys.items():
        if name in explicit or key not in zero:
            zero[key] = getattr(ds, name)
    for name, key in (("offload_optimizer", "offload_optimizer"), ("offload_params", "offload_param")):
        if name in explicit or key not in zero:
            if getattr(ds, name) == "none":
                zero.pop(key, None)
            else:
                zero[key] = {"device": getattr(ds, name), "pin_memory": on_cuda}
    out = {**base, **derived, "zero_optimization": zero}
    if "bf16" in explicit or "bf16" not in base:
        bf16 = ds.bf16 if isinstance(ds.bf16, bool) else (
            cfg.train.dtype == "bfloat16" or (cfg.train.dtype == "auto" and on_cuda))
        out["bf16"] = {"enabled": bool(bf16)}
    out.setdefault("steps_per_print", 2**31 - 1)  # lctrain logs the metrics itself
    out.setdefault("wall_clock_breakdown", False)
    out["zero_allow_untested_optimizer"] = True  # a plain torch AdamW
    out["zero_force_ds_cpu_optimizer"] = False  # ... also when its state is offloaded to the CPU
    return out


class LMOutputs(NamedTuple):
    loss_sum: torch.Tensor | None
    n_targets: torch.Tensor | None
    logits: torch.Tensor | None
    hidden: torch.Tensor | None


class TupleOutputs(torch.nn.Module):
    """The language model returning a named tuple instead of a dataclass: ZeRO-3 re-gathers a module's weights in
    backward through hooks on the tensors it returns, and it cannot see tensors inside a dataclass."""

    def __init__(self, lm: torch.nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, *args, **kwargs) -> LMOutputs:
        out = self.lm(*args, **kwargs)
        return LMOutputs(out.loss_sum, out.n_targets, out.logits, out.hidden)


class DeepSpeedEngine:
    name = "deepspeed"

    def __init__(self, module: torch.nn.Module, cfg, env, layout):
        self.module, self.cfg, self.env = module, cfg, env
        deepspeed = import_deepspeed(env.device)
        self._deepspeed = deepspeed
        self.config = deepspeed_config(cfg, layout, env.device.type == "cuda")
        self.stage = self.config["zero_optimization"]["stage"]
        trained = module
        if self.stage == 3:
            trained = TupleOutputs(module)
            # The LM head multiplies by the embedding (or head) weight in the top-level forward, outside the
            # module that owns it (whose gradient the fused loss also forms there): ZeRO-3 must gather it
            # for the wrapper's forward and backward.
            deepspeed.zero.register_external_parameter(trained, module.head_weight)
        optimizer = build_optimizer(module, cfg.train)
        scheduler = build_scheduler(optimizer, cfg.train)
        self.model, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=trained, optimizer=optimizer, lr_scheduler=scheduler, config=self.config, dist_init_required=False)
        self.params = [p for p in module.parameters() if p.requires_grad]
        # Under ZeRO-3 every forward all-gathers weights (through the wrapper's hooks): all ranks evaluate alike.
        self.eval_model = self.model if self.stage == 3 else module
        self.eval_shares_batches = self.stage != 3

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    @contextlib.contextmanager
    def micro_step(self, last: bool):
        yield
        if not last:
            self.model.step()  # not an accumulation boundary: DeepSpeed only advances its micro-step counter

    def backward(self, loss_sum: torch.Tensor, scale: float) -> None:
        # scale already includes everything: DeepSpeed must not divide by the accumulation steps again.
        self.model.backward(loss_sum * scale, scale_wrt_gas=False)

    def step(self, loss: float) -> tuple[float, bool]:
        grad_norm = None
        if self.stage == 0:  # full gradients on every rank: measure them before DeepSpeed clips
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, float("inf")))
        self.model.step()
        if grad_norm is None:
            norm = self.model.get_global_grad_norm()
            grad_norm = float(norm) if norm is not None else float("nan")
        return grad_norm, True

    # ------------------------------------------------------------------------------------------- checkpoints
    def _full_weights(self) -> dict[str, torch.Tensor]:
        """Every weight in full on rank 0 (collective under ZeRO-3, where each rank holds a partition)."""
        if self.stage != 3:
            return _model_tensors(self.module) if self.env.is_main else {}
        with self._deepspeed.zero.GatheredParameters(list(self.module.parameters()), modifier_rank=None):
            if not self.env.is_main:
                return {}
            return {k: v.clone() for k, v in _model_tensors(self.module).items()}

    def save(self, ckpt, step: int, trainer_state: dict, data_state: dict, config_yaml: str, barrier) -> Path:
        def write(tmp: Path) -> None:
            self.model.save_checkpoint(str(tmp), tag=TAG, client_state={"lctrain": trainer_state},
                                       save_latest=False)
            weights = self._full_weights()
            if self.env.is_main:  # lctrain's own weights file: export and init_from read it as for DDP
                save_file(weights, str(tmp / "model.safetensors"))

        return ckpt.save(step, None, None, trainer_state, data_state, config_yaml, barrier, collective_write=write)

    def load(self, ckpt, path: Path) -> tuple[dict, dict]:
        def restore(directory: Path) -> None:
            if not (directory / TAG).is_dir():
                raise ConfigError(f"checkpoint {directory} was written by the ddp engine; resume with "
                                  "train.engine=ddp (or start a new run with checkpoint.init_from)")
            loaded, _ = self.model.load_checkpoint(str(directory), tag=TAG, load_optimizer_states=True,
                                                   load_lr_scheduler_states=True)
            if loaded is None:
                raise RuntimeError(f"deepspeed could not load {directory / TAG}")

        return ckpt.load(path, None, None, load_engine_state=restore)
