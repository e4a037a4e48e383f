"""Starting or continuing a run, decided before anything in the run directory is written.

Order (Trainer.run): take the run-dir lock; choose the checkpoint (rank 0 verifies, every rank learns the
answer); refuse what cannot change (model shape, tokenizer; the data loader refuses other data); load it; let the
recipe win for the hyperparameters. Only then are config.yaml and tokenizer/ written, so a refused resume leaves
the run directory as the last good run left it.
"""
from __future__ import annotations

from pathlib import Path

import yaml

from lctrain.config import ConfigError
from lctrain.train.checkpoint import CheckpointManager
from lctrain.train.checkpoint_select import CheckpointError, Selection, step_dirs
from lctrain.train.run_lock import RunDirBusy, RunLock

# Hyperparameters the recipe sets on resume (the checkpoint keeps moments, step counts and the data position).
RECIPE_WINS = ("lr", "min_lr_ratio", "warmup_steps", "schedule", "decay_fraction", "steps", "weight_decay", "beta1",
               "beta2", "eps", "grad_clip")


def _share(env, value, error: Exception | None):
    """Rank 0's (value, error) on every rank; every rank raises rank 0's error."""
    if env.distributed:
        import torch.distributed as dist
        box = [(value, (type(error).__name__, str(error)) if error is not None else None)]
        dist.broadcast_object_list(box, src=0)
        value, shared = box[0]
        if shared is not None and error is None:
            kinds = {"RunDirBusy": RunDirBusy, "CheckpointError": CheckpointError}
            error = kinds.get(shared[0], ConfigError)(shared[1])
    if error is not None:
        raise error
    return value


def take_run_lock(run_dir: Path, env, log=print) -> tuple[RunLock | None, str]:
    """Rank 0 takes the run-dir lock before anything is written; a busy run dir stops every rank (exit 2).
    Returns the lock (rank 0) and a name for this run's temporary files, the same on every rank."""
    lock, error = None, None
    if env.is_main:
        try:
            lock = RunLock(run_dir).acquire(log=log)
        except RunDirBusy as exc:
            error = exc
        except OSError as exc:  # e.g. a read-only or missing parent directory: every rank must hear of it
            error = ConfigError(f"run.dir: cannot take the lock in {run_dir}: {exc.strerror or exc}")
    token = f"{lock.record['host']}-{lock.record['pid']}" if lock is not None else None
    token = _share(env, token, error)
    return lock, "".join(c if c.isalnum() or c in "-_." else "_" for c in token)


def choose_checkpoint(ckpt: CheckpointManager, env, resume: bool) -> Selection:
    """Rank 0 finds the newest checkpoint that verifies; every rank gets the same answer."""
    chosen, error = Selection(None), None
    if env.is_main:
        try:
            chosen = ckpt.select() if resume else Selection(None)
        except CheckpointError as exc:
            error = exc
        except OSError as exc:
            error = CheckpointError(f"cannot read the checkpoints in {ckpt.root}: {exc.strerror or exc}")
    chosen = _share(env, chosen, error)
    ckpt.resumed_from = chosen.path
    ckpt.known_bad = {name for name, _ in chosen.skipped}
    return chosen


def fresh_start_note(ckpt: CheckpointManager, resume: bool) -> str | None:
    if not resume and step_dirs(ckpt.root):
        return (f"checkpoint.resume=false: starting from step 0; the {len(step_dirs(ckpt.root))} existing "
                "checkpoint(s) are replaced as new saves are pruned")
    return None


def _saved_config(path: Path) -> dict:
    try:
        tree = yaml.safe_load((path / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}
    return tree if isinstance(tree, dict) else {}


def check_compatible(cfg, path: Path, tokenizer, run_dir: Path) -> None:
    """Refuse, in one line, a resume whose tokenizer or model shape differ from the checkpoint's (the tokenizer
    first: a new tokenizer changes the vocabulary size too)."""
    saved_tokenizer = run_dir / "tokenizer" / "tokenizer.model"
    if saved_tokenizer.is_file() and saved_tokenizer.read_bytes() != tokenizer.model_proto:
        raise ConfigError(f"data.tokenizer: this run's tokenizer differs from {saved_tokenizer}, which the "
                          f"checkpoints were trained with; resume with the same tokenizer or use another run.dir")
    from lctrain.export.run_files import SHAPE_KEYS
    saved = _saved_config(path).get("model") or {}
    for key in SHAPE_KEYS:
        if key in saved and saved[key] != getattr(cfg.model, key):
            raise ConfigError(f"model.{key}: {getattr(cfg.model, key)!r} differs from {saved[key]!r} in {path}; the "
                              "model shape cannot change on resume (use another run.dir, with checkpoint.init_from "
                              "for the weights)")


def _show(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def recipe_changes(train_cfg, path: Path) -> list[str]:
    """`train.lr: 0.003 -> 0.0001 (from the recipe)` for each recipe-owned value that differs from the checkpoint's."""
    saved = _saved_config(path).get("train") or {}
    lines = []
    for key in RECIPE_WINS:
        if key in saved and saved[key] != getattr(train_cfg, key):
            lines.append(f"train.{key}: {_show(saved[key])} -> {_show(getattr(train_cfg, key))} (from the recipe)")
    return lines


def apply_recipe(optimizer, scheduler, train_cfg) -> None:
    """After loading optimizer and scheduler state: the recipe's lr, betas, eps and weight decay, and the schedule
    as the recipe defines it at the checkpoint's step. Moments and step counts stay as loaded. The schedule
    function reads train_cfg itself (warm-up, shape, length), so only its base rates need resetting."""
    for i, group in enumerate(optimizer.param_groups):
        group["betas"] = (train_cfg.beta1, train_cfg.beta2)
        group["eps"] = train_cfg.eps
        if i == 0:  # build_optimizer: group 0 decays, group 1 (norms, biases, embeddings) never does
            group["weight_decay"] = train_cfg.weight_decay
        group["initial_lr"] = train_cfg.lr
    scheduler.base_lrs = [train_cfg.lr for _ in optimizer.param_groups]
    factors = [fn(scheduler.last_epoch) for fn in scheduler.lr_lambdas]
    for group, factor in zip(optimizer.param_groups, factors):
        group["lr"] = train_cfg.lr * factor
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


def set_aside_old_metrics(run_dir: Path) -> str | None:
    """A fresh start in a run dir that already logged steps (killed before its first checkpoint, or
    checkpoint.resume=false): keep the old lines under another name instead of mixing two runs' steps."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file() or path.stat().st_size == 0:
        return None
    import time
    aside = run_dir / f"metrics.before-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}.jsonl"
    path.rename(aside)
    return f"starting from step 0: the earlier {path.name} was moved to {aside.name}"
