"""Build the frozen teacher of a distillation run from `distill.teacher` (or `checkpoint.init_from`)."""
from __future__ import annotations

import torch

from lctrain.config import ConfigError, ModelConfig
from lctrain.models import LanguageModel
from lctrain.train.checkpoint import load_weights


def teacher_model_config(source: str, vocab_size: int) -> ModelConfig:
    """The teacher's model config, read from its checkpoint (an lctrain run/checkpoint or hf:PATH)."""
    if source.startswith("hf:"):
        from lctrain.export.hf_import import follow_hf_config
        cfg = ModelConfig()
        follow_hf_config(cfg, source[3:])
    else:
        from lctrain.export.run_files import locate
        cfg = locate(source, where="distill.teacher").model_cfg
    if cfg.vocab_size != vocab_size:
        raise ConfigError(f"distill.teacher: {source} has a vocabulary of {cfg.vocab_size}, the student "
                          f"{vocab_size}; teacher and student must share the tokenizer and vocabulary size")
    cfg.activation_checkpointing = False  # no backward through the teacher
    return cfg


def build_teacher(source: str, model_cfg: ModelConfig, device: torch.device, dtype: torch.dtype | None):
    """The teacher on `device`, frozen, in `dtype` when given (bf16 under autocast on GPUs: half the memory)."""
    teacher = LanguageModel(model_cfg)
    load_weights(teacher, source, where="distill.teacher")
    teacher = teacher.to(device)
    if dtype is not None:
        teacher = teacher.to(dtype)
    return teacher.eval().requires_grad_(False)
