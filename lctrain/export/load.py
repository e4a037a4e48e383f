"""`lctrain.load_model(path) -> (model, tokenizer)` for a run directory, a checkpoint directory or an export.

    model, tok = lctrain.load_model("runs/tiny")
    logits = model(torch.tensor([tok.encode("def main():")]))      # [B, T, vocab]
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import torch.nn as nn

from lctrain.config import ConfigError, ModelConfig
from lctrain.data.tokenizer import Tokenizer
from lctrain.models import LanguageModel
from lctrain.train.checkpoint import load_weights


class CausalLM(nn.Module):
    """A `LanguageModel` whose call returns logits: model(input_ids [B, T], position_ids=None) -> [B, T, vocab]."""

    def __init__(self, lm: LanguageModel):
        super().__init__()
        self.lm = lm

    @property
    def config(self) -> ModelConfig:
        return self.lm.cfg

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        return self.lm(input_ids, position_ids=position_ids, return_logits=True).logits


def _from_export(path: Path) -> tuple[LanguageModel, Tokenizer | None]:
    from lctrain.export import hf_config
    from lctrain.export.hf_import import load_hf_weights

    hf = hf_config.read_hf_config(path)
    hf_config.check_supported(hf, "load_model")
    lm = LanguageModel(dataclasses.replace(ModelConfig(), **hf_config.model_keys_from_hf(hf)))
    load_hf_weights(lm, path)
    tokenizer = Tokenizer.load(path / "tokenizer.model") if (path / "tokenizer.model").is_file() else None
    return lm, tokenizer


def _from_run(path: Path) -> tuple[LanguageModel, Tokenizer | None]:
    from lctrain.export.run_files import locate

    files = locate(path)
    lm = LanguageModel(files.model_cfg)
    load_weights(lm, files.weights, where="load_model")
    return lm, Tokenizer.load(files.tokenizer) if files.tokenizer else None


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[CausalLM, Tokenizer | None]:
    """Model in eval mode (fp32) and its tokenizer (None when the run has none on disk)."""
    path = Path(path)
    if not path.is_dir():
        raise ConfigError(f"load_model: {path} is not a directory (expected a run, checkpoint or export directory)")
    lm, tokenizer = _from_export(path) if (path / "config.json").is_file() else _from_run(path)
    return CausalLM(lm).to(device).eval(), tokenizer
