"""`train.engine: fsdp` — PyTorch FSDP2 (`fully_shard`): parameters, gradients and AdamW state sharded.

Each block is one FSDP unit (its weights are all-gathered just before it runs and freed after, or kept until
backward with `parallel.reshard_after_forward: false`); the root unit holds the embedding, final norm and LM head.
Weights, gradients and optimizer state are sharded over every rank of the DP x SP world (as torchtitan shards over
dp_shard x cp): SP ranks hold the same weights, so the gradient reduce-scatter averages over both dimensions,
which is the loop's normalisation. On CUDA the compute runs in bf16 from fp32 master weights, with gradients
reduced in fp32.

A model is built on `meta` and materialised shard by shard (`lctrain.train.meta_init`): from its own init, or from
`checkpoint.init_from` read piece by piece (`lctrain.train.meta_source`; from safetensors and `hf:` sources each rank
reads only its own shards' rows; a LoRA checkpoint is loaded whole on the host first). Checkpoints are DCP shards
(`lctrain.train.dcp_checkpoint`) in the usual `step-<N>/` layout and resume on any world size.

LoRA: adapters are injected (`Trainer._init_from`, on meta too) before `fully_shard`, so the frozen base
weights are sharded with them; only what trains is in the optimizer and in the checkpoint (`dcp_checkpoint`), with
adapter.json naming the base as under ddp. `model.compile` compiles each block before it is sharded (torchtitan's
order); FSDP2's hooks are excluded from tracing and run eagerly around each block's compiled graph.

Gradient accumulation: gradients are reduce-scattered on the last micro-batch of a step only (the earlier ones
accumulate unsharded gradients); `parallel.fsdp_grad_sync: micro_step` reduce-scatters every micro-batch instead,
trading communication for the memory of full gradients.
"""
from __future__ import annotations

import atexit
import contextlib
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from lctrain.config import ConfigError
from lctrain.train.dcp_checkpoint import DCP_DIR, ShardedSaver, is_sharded_checkpoint, load_training_state
from lctrain.train.meta_init import blueprint_of, materialize
from lctrain.train.optim import build_optimizer, build_scheduler, clip_and_step


def ensure_process_group(env) -> None:
    """FSDP and DCP need a process group even for one process: give a single process a private one."""
    if not dist.is_initialized():
        backend = "nccl" if env.device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        atexit.register(lambda: dist.is_initialized() and dist.destroy_process_group())


def shard_mesh(env, layout):
    """The 2-D (dp, sp) device mesh, SP groups of contiguous ranks as in `lctrain.parallel.groups`, flattened
    into the one dimension the weights are sharded over."""
    mesh = init_device_mesh(env.device.type, (layout.dp, layout.sp), mesh_dim_names=("dp", "sp"))
    return mesh["dp", "sp"]._flatten("dp_sp") if layout.sp > 1 else mesh["dp"]


def mixed_precision(cfg, device: torch.device) -> MixedPrecisionPolicy:
    bf16 = cfg.train.dtype == "bfloat16" or (cfg.train.dtype == "auto" and device.type == "cuda")
    if not bf16:
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


class FSDPEngine:
    name = "fsdp"

    def __init__(self, module: torch.nn.Module, cfg, env, layout):
        self.module, self.cfg, self.env = module, cfg, env
        ensure_process_group(env)
        self.mesh = shard_mesh(env, layout)
        on_meta = any(p.is_meta for p in module.parameters())
        source = module.__dict__.pop("_init_source", None)  # checkpoint.init_from, read piece by piece
        blueprint = blueprint_of(module) if on_meta else None
        policy = mixed_precision(cfg, env.device)
        reshard = cfg.parallel.reshard_after_forward
        for block in module.layers:
            fully_shard(block, mesh=self.mesh, reshard_after_forward=reshard, mp_policy=policy)
        fully_shard(module, mesh=self.mesh, reshard_after_forward=reshard, mp_policy=policy)
        if on_meta:
            fill = read_local = None
            if source is not None:
                from lctrain.train.meta_source import filler, local_reader
                fill, read_local = filler(module, source), local_reader(module, source)
            materialize(module, blueprint, env.device, fill, read_local)
            del blueprint
        else:
            module.to(env.device)
        self.model = module
        self.optimizer = build_optimizer(module, cfg.train)
        self.scheduler = build_scheduler(self.optimizer, cfg.train)
        self.params = [p for p in module.parameters() if p.requires_grad]
        # Every forward all-gathers weights, a collective: all ranks evaluate every batch (as under ZeRO-3).
        self.eval_model = module
        self.eval_shares_batches = False
        self.sync_every_micro_step = cfg.parallel.fsdp_grad_sync == "micro_step"
        self.saver = ShardedSaver(cfg.checkpoint.async_save, env.is_main)

    def shard_frozen(self, module: torch.nn.Module) -> None:
        """Shard a frozen model (a distillation teacher) over the same mesh, block by block, so it costs each rank
        its share of the weights; its forward all-gathers them like the student's."""
        policy = mixed_precision(self.cfg, self.env.device)
        for block in module.layers:
            fully_shard(block, mesh=self.mesh, reshard_after_forward=True, mp_policy=policy)
        fully_shard(module, mesh=self.mesh, reshard_after_forward=True, mp_policy=policy)

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def micro_step(self, last: bool):
        self.model.set_requires_gradient_sync(last or self.sync_every_micro_step)
        return contextlib.nullcontext()

    def backward(self, loss_sum: torch.Tensor, scale: float) -> None:
        (loss_sum * scale).backward()

    def step(self, loss: float) -> tuple[float, bool]:
        """Clip by the norm over all shards (DTensor norms reduce across the mesh), skip non-finite steps."""
        return clip_and_step(self.params, self.optimizer, self.scheduler, self.cfg.train.grad_clip, loss)

    # ------------------------------------------------------------------------------------------- checkpoints
    def save(self, ckpt, step: int, trainer_state: dict, data_state: dict, config_yaml: str, barrier) -> Path:
        main_files = None
        if getattr(self.module, "_lora_cfg", None) is not None:  # adapter.json names the base, as under ddp
            from lctrain.train.lora import write_adapter_meta
            main_files = lambda tmp: write_adapter_meta(self.module, tmp, self.module._lora_base)  # noqa: E731
        return self.saver.save(ckpt, step, self.model, self.optimizer, trainer_state, data_state, config_yaml,
                               barrier, main_files=main_files)

    def finish_saves(self) -> None:
        """Wait for a background save to complete its checkpoint (collective; the loop calls it before exiting)."""
        self.saver.finish()

    def load(self, ckpt, path: Path) -> tuple[dict, dict]:
        def restore(directory: Path) -> None:
            if not is_sharded_checkpoint(directory):
                other = "deepspeed" if (directory / "deepspeed").is_dir() else "ddp"
                raise ConfigError(f"checkpoint {directory} was written by the {other} engine (no {DCP_DIR}/); resume "
                                  f"with train.engine={other} (or start a new run with checkpoint.init_from)")
            load_training_state(self.model, self.optimizer, directory / DCP_DIR)

        # DCP reshards: a checkpoint from any world size continues here (the data position is global).
        return ckpt.load(path, None, None, load_engine_state=restore, any_world_size=True)
