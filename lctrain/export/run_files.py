"""Find the pieces of a trained model on disk: model config, weights and tokenizer of a run or checkpoint dir.

Accepted: a run directory (`<run.dir>`, its newest checkpoint is used), its `checkpoints/` directory, or one
`checkpoints/step-N/` directory. The tokenizer is the run's `tokenizer/tokenizer.model` (written at the start
of every run), else the recipe's `data.tokenizer`.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

import yaml

from lctrain.config import ConfigError, ModelConfig
from lctrain.train.checkpoint import resolve_weights


@dataclass
class RunFiles:
    weights: Path
    model_cfg: ModelConfig
    tokenizer: Path | None
    max_positions: int  # the training context length (data.seq_len)


def _read_yaml(path: Path) -> dict:
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not readable as YAML ({exc})") from None
    if not isinstance(tree, dict) or not isinstance(tree.get("model"), dict):
        raise ConfigError(f"{path}: no `model` section; is this an lctrain config.yaml?")
    return tree


def model_config_from(tree: dict, where: Path) -> ModelConfig:
    known = {f.name for f in fields(ModelConfig)}
    unknown = sorted(set(tree["model"]) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown model keys {unknown}; was it written by a newer lctrain?")
    cfg = ModelConfig(**tree["model"])
    if cfg.vocab_size <= 0:
        raise ConfigError(f"{where}: model.vocab_size is not resolved; the run never started training")
    return cfg


def locate(source: str | Path, where: str = "export") -> RunFiles:
    source = Path(source)
    if not source.exists():
        raise ConfigError(f"{where}: {source} does not exist (expected a run directory or a checkpoint directory)")
    try:
        weights = resolve_weights(source)
    except FileNotFoundError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    checkpoint_dir = weights.parent
    config_path = next((p for p in (checkpoint_dir / "config.yaml", source / "config.yaml") if p.is_file()), None)
    if config_path is None:
        raise ConfigError(f"{where}: no config.yaml beside {weights}; cannot tell the model's shape")
    tree = _read_yaml(config_path)
    run_dir = checkpoint_dir.parent.parent if checkpoint_dir.parent.name == "checkpoints" else source
    candidates = [run_dir / "tokenizer" / "tokenizer.model", source / "tokenizer" / "tokenizer.model"]
    recipe_tokenizer = (tree.get("data") or {}).get("tokenizer")
    if recipe_tokenizer:
        candidates.append(Path(recipe_tokenizer))
    tokenizer = next((p for p in candidates if p.is_file()), None)
    seq_len = int((tree.get("data") or {}).get("seq_len") or 2048)
    return RunFiles(weights, model_config_from(tree, config_path), tokenizer, seq_len)


# Model keys that fix the weights' shapes and meaning; a run started from an lctrain checkpoint inherits them.
SHAPE_KEYS = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_dim", "pattern",
              "rope_theta", "norm_eps", "tie_embeddings")


def follow_run_checkpoint(cfg, source: str) -> None:
    """Recipe side of `checkpoint.init_from: RUN`: the model's shape keys follow the base run where the recipe
    leaves them at their defaults, the base's per-mixer options sit under the recipe's (so a fine-tuning recipe
    names only what changes, e.g. `mixers.attn.rope_scaling`), and the base's tokenizer is used when the recipe
    names none (token ids must mean what the base learned)."""
    from lctrain.export.hf_import import adopt_model_keys

    path = Path(source)
    if path.is_file() and not (path.parent / "config.yaml").is_file():
        return  # a bare weights file: nothing to follow, the recipe must match it
    files = locate(source, where="checkpoint.init_from")
    base = files.model_cfg
    adopt_model_keys(cfg.model, {k: getattr(base, k) for k in SHAPE_KEYS}, source)
    merged = {k: dict(v) for k, v in (base.mixers or {}).items()}
    for kind, opts in (cfg.model.mixers or {}).items():
        merged.setdefault(kind, {}).update(opts or {})
    cfg.model.mixers = merged
    if not cfg.data.tokenizer and files.tokenizer is not None:
        cfg.data.tokenizer = str(files.tokenizer)
