"""What an evaluation runs on: a run directory, a checkpoint directory or an export, resolved to a model, its
tokenizer, the training config (when there is one) and the longest context the evaluation will accept."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from lctrain.config import Config, ConfigError, load_config

# Beyond this multiple of the training context, results say more about RoPE extrapolation than about the model;
# longer lengths need an explicit --max-length.
LENGTH_CAP_FACTOR = 16


@dataclass
class EvalTarget:
    model: torch.nn.Module  # `LanguageModel` call signature, eval mode
    tokenizer: object | None  # `lctrain.data.Tokenizer`, or None when the run has none on disk
    train_seq_len: int  # data.seq_len the model was trained with
    run_dir: Path | None = None  # set when evaluating a run (or a checkpoint inside one): TensorBoard goes there
    config: Config | None = None  # the run's resolved config, when readable
    step: int = 0  # training step of the evaluated weights

    @property
    def max_length(self) -> int:
        return LENGTH_CAP_FACTOR * self.train_seq_len

    def require_tokenizer(self, task: str):
        if self.tokenizer is None:
            raise ConfigError(f"eval --task {task}: the model has no tokenizer on disk (expected "
                              "<run>/tokenizer/tokenizer.model or the recipe's data.tokenizer); this task needs one")
        return self.tokenizer


def _checkpoint_dir(path: Path) -> Path | None:
    """The checkpoint directory whose weights `path` names (run dir -> latest checkpoint)."""
    from lctrain.train.checkpoint import resolve_weights
    try:
        return resolve_weights(path).parent
    except FileNotFoundError:
        return None


def load_target(path: str | Path, device: str = "cpu") -> EvalTarget:
    """Resolve `path` (run dir, checkpoint dir or export dir) into an `EvalTarget`."""
    from lctrain import load_model

    path = Path(path)
    if not path.exists():
        raise ConfigError(f"eval: {path} does not exist; expected a run directory, a checkpoint directory or an "
                          "export")
    if not path.is_dir():
        raise ConfigError(f"eval: {path} is not a directory; expected a run directory, a checkpoint directory or an "
                          "export")
    is_export = (path / "config.json").is_file()
    checkpoint = None if is_export else _checkpoint_dir(path)
    if not is_export and checkpoint is None:
        raise ConfigError(f"eval: no model weights under {path} (expected a run directory with checkpoints/latest, "
                          "a checkpoint directory or an export)")
    wrapped, tokenizer = load_model(path, device)
    model = getattr(wrapped, "lm", wrapped)  # the incremental-decoding path lives on the LanguageModel itself
    model.eval()
    if is_export:
        hf = json.loads((path / "config.json").read_text())
        seq_len = int(hf.get("max_position_embeddings") or 2048)
        return EvalTarget(model, tokenizer, seq_len)
    run_dir = checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else None
    config_path = next((p for p in (checkpoint / "config.yaml", path / "config.yaml") if p.is_file()), None)
    tree = yaml.safe_load(config_path.read_text()) if config_path else {}
    seq_len = int(((tree or {}).get("data") or {}).get("seq_len") or 2048)
    config = None
    if config_path is not None:
        try:
            config = load_config(config_path)
        except ConfigError:
            config = None  # e.g. a data file moved since training: the weights are still evaluable
    trainer = checkpoint / "trainer.json"
    step = int(json.loads(trainer.read_text()).get("step", 0)) if trainer.is_file() else 0
    return EvalTarget(model, tokenizer, seq_len, run_dir=run_dir, config=config, step=step)


def check_lengths(target: EvalTarget, lengths: list[int], max_length: int | None, option: str = "--lengths") -> None:
    """Refuse lengths beyond the cap (one line naming the length, the cap and how to raise it)."""
    cap = max_length or target.max_length
    too_long = [n for n in lengths if n > cap]
    if too_long:
        raise ConfigError(f"eval {option}: {too_long[0]} exceeds the longest supported context {cap} "
                          f"({LENGTH_CAP_FACTOR} x the training length {target.train_seq_len}); pass --max-length "
                          "to go further")
    bad = [n for n in lengths if n < 2]
    if bad:
        raise ConfigError(f"eval {option}: {bad[0]} is too short; expected lengths >= 2")
