"""One way to run the recipe: how the world is split and what each GPU keeps."""
from __future__ import annotations

from dataclasses import asdict, dataclass

ENGINES = ("ddp", "zero1", "zero2", "zero3", "fsdp")


@dataclass(frozen=True)
class Candidate:
    world: int                   # GPUs
    sp: int                      # sequence-parallel group size; dp = world // sp
    attn: str                    # allgather | ring | ulysses (irrelevant without attention layers)
    layout: str                  # contiguous | zigzag
    engine: str                  # ddp | zero1 | zero2 | zero3 | fsdp
    activation_checkpointing: bool
    micro_batch_size: int

    @property
    def dp(self) -> int:
        return self.world // self.sp

    def as_dict(self) -> dict:
        out = asdict(self)
        out["dp"] = self.dp
        return out


@dataclass(frozen=True)
class Workload:
    """What does not change between candidates: the sample length, the global batch and the numeric format."""
    seq_len: int
    tokens_per_step: int
    dtype_bytes: int = 2            # activations (bf16 autocast on GPUs; 4 for the fp32 CPU validation)
    gpus_per_node: int = 8
    backend: str = "triton"         # "triton" (GPU kernels) or "torch" (the chunked CPU path)
    mixed_precision: bool = True    # fp32 master weights + bf16 autocast (False: everything in dtype_bytes)


def engine_of(cfg) -> str:
    """The planner's engine name for a recipe's `train.engine` (+ `deepspeed.zero_stage`)."""
    engine = cfg.train.engine
    if engine == "deepspeed":
        return "ddp" if cfg.deepspeed.zero_stage == 0 else f"zero{cfg.deepspeed.zero_stage}"
    return engine
