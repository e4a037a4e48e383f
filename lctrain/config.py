"""Typed recipe schema, YAML loading, dotted command-line overrides and validation.

A recipe is YAML mapped onto `Config` (one dataclass per section). Every error — unknown key, wrong type, bad value,
impossible combination, missing file, YAML syntax — raises `ConfigError` with one line naming the dotted key, the bad
value and what is allowed; the CLI prints it and exits with code 2.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml


class ConfigError(ValueError):
    """A recipe or override that cannot be used; the message is one line meant for the user."""


# ----------------------------------------------------------------------------------------------- sections
@dataclass
class RunConfig:
    name: str = ""  # defaults to the recipe file's stem
    dir: str = ""  # defaults to runs/<name>


@dataclass
class ModelConfig:
    vocab_size: int = 0  # 0: take the tokenizer's
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 0  # 0: same as n_heads (no GQA)
    head_dim: int = 0  # 0: d_model // n_heads
    ffn_dim: int = 0  # 0: 8/3 * d_model rounded up to a multiple of 64 (SwiGLU)
    # Layer types, one letter per layer repeated to n_layers ("GGGA"), or an explicit list of registry names.
    pattern: Union[str, list] = "A"
    # Per-mixer-type options, e.g. {gdn: {head_k_dim: 64}}; each mixer validates its own section.
    mixers: dict = field(default_factory=dict)
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    tie_embeddings: bool = True
    init_std: float = 0.02
    # cross-entropy (fused with the LM head) is computed this many tokens at a time; 0: auto (chunks whose fp32
    # logits fit lctrain.models.loss.AUTO_LOGITS_BUDGET_BYTES, often the whole micro-batch)
    loss_chunk_tokens: int = 0
    # recurrent kernel ops (gdn, linear, based) recompute their forward in backward (true: they keep only their
    # inputs); false runs them directly under autograd in eager mode: no recompute, their chunk tensors kept
    kernel_recompute: bool = True
    activation_checkpointing: bool = False
    compile: bool = False  # torch.compile every block (lctrain.models.compile)
    compile_backend: Literal["inductor", "aot_eager", "eager"] = "inductor"
    # softmax attention: auto = flash-attn if installed on CUDA, else the Triton kernels on CUDA, else torch
    attn_backend: Literal["auto", "triton", "flash", "torch"] = "auto"
    # MoA plan (JSON from `lctrain moa search`): per-head elastic sliding-window spans for the attention layers.
    attn_plan: str = ""


SYNTHETIC_SOURCES = ("mqar", "passkey")  # generated from a seed (lctrain.data.synthetic), no files


@dataclass
class SourceConfig:
    type: Literal["text", "jsonl", "parquet", "stdlib", "mqar", "passkey", "hf"] = "text"
    path: str = ""  # file, directory or glob (unused for `stdlib`, `hf` and the synthetic types)
    # `hf` only: a Hugging Face dataset by name (local cache) or a `save_to_disk` directory, through `datasets`
    name: str = ""
    config: str = ""  # the dataset's configuration (subset) name
    split: str = "train"
    field: str = "text"  # jsonl/parquet column holding the document
    weight: float = 1.0  # mixture weight across sources
    # Synthetic types only (`mqar`, `passkey`):
    num_examples: int = 20000  # documents per epoch (the held-out split adds data.eval_fraction of that)
    seed: int = 0  # the documents are a pure function of this seed and the options below
    length: int = 0  # tokens per document; 0: data.seq_len - 2, so that [BOS] doc [EOS] fills one window
    num_kv_pairs: int = 8  # mqar: key-value pairs per document (all of them are queried)
    task_vocab: int = 256  # mqar: token ids used, keys from the first half, values from the second
    answer_only: bool = False  # passkey: loss on the answer tokens only (mqar always trains on its answers only)


@dataclass
class DataConfig:
    sources: list = field(default_factory=lambda: [SourceConfig(type="stdlib")])
    tokenizer: str = ""  # path to a sentencepiece .model; empty: train one on the sources (cached)
    vocab_size: int = 4096  # size of a trained tokenizer
    tokenizer_sample_chars: int = 4_000_000  # characters of text the tokenizer is trained on
    seq_len: int = 256
    eval_fraction: float = 0.02  # documents held out for evaluation
    max_documents: int = 0  # 0: all; otherwise the first N documents of each source (quick experiments)
    batching: Literal["mixed", "per_source"] = "mixed"  # per_source: each step from one source, by weight
    cache_dir: str = ""  # tokenised data and trained tokenizers; empty: $LCTRAIN_CACHE or ~/.cache/lctrain
    eval_sources: list = field(default_factory=list)  # explicit validation set (as `sources`); replaces eval_fraction
    num_workers: int = 0  # tokenising processes per rank; 0: the cores available to this rank
    on_bad_record: Literal["error", "skip"] = "error"  # skip: bad records are skipped and counted
    streaming: bool = False  # read and tokenise while training (no cache, no start-up pass; eval from eval_sources)


@dataclass
class TrainConfig:
    steps: int = 100
    stop_at: int = 0  # end this process after this step with a checkpoint (time-sliced jobs); 0: run to the end
    seed: int = 0
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # final lr = lr * min_lr_ratio
    warmup_steps: int = 10
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    decay_fraction: float = 0.2  # WSD: fraction of steps spent decaying
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables clipping (the norm is still logged)
    micro_batch_size: int = 8  # sequences per process per forward
    tokens_per_step: int = 0  # 0: micro_batch_size * seq_len * dp (no accumulation)
    eval_interval: int = 0  # 0: evaluate only at the end
    eval_batches: int = 4
    log_interval: int = 1
    max_bad_steps: int = 5  # abort after this many consecutive non-finite steps
    engine: Literal["ddp", "deepspeed", "fsdp"] = "ddp"
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU


@dataclass
class ParallelConfig:
    sp: int = 1  # sequence-parallel group size
    layout: Literal["contiguous", "zigzag"] = "contiguous"
    attn: Literal["allgather", "ring", "ulysses"] = "allgather"
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    timeout_s: float = 600.0  # every collective; a frozen or dead rank ends the job after this (plus a grace)
    # fsdp engine: free each block's gathered weights after its forward (gather again in backward); false keeps
    # them until backward (more memory, one all-gather less per block)
    reshard_after_forward: bool = True
    # fsdp engine: reduce-scatter gradients once per step (`step`) or after every micro-batch (`micro_step`: less
    # memory under gradient accumulation, more communication)
    fsdp_grad_sync: Literal["step", "micro_step"] = "step"


@dataclass
class CheckpointConfig:
    interval: int = 0  # steps between saves; 0: only at the end
    keep_last: int = 2
    init_from: str = ""  # weights-only start: a checkpoint or run directory
    resume: bool = True  # continue from the newest checkpoint that verifies (whatever `latest` says)
    reset_data: bool = False  # on resume, start the data from its beginning (a deliberately changed data mix)
    # fsdp engine: write the shards in the background while training goes on (`checkpoint.async` is the same key)
    async_save: bool = False


@dataclass
class DeepSpeedConfig:
    """Used when train.engine is `deepspeed`. The batch triad and gradient clipping always come from `train.*`."""
    zero_stage: int = 1  # 0 (plain data parallel), 1 (optimizer states), 2 (+ gradients), 3 (+ parameters)
    offload_optimizer: Literal["none", "cpu"] = "none"  # ZeRO >= 1: optimizer states (and step) on the CPU
    offload_params: Literal["none", "cpu"] = "none"  # ZeRO 3: parameters live on the CPU between uses
    bf16: Union[bool, Literal["auto"]] = "auto"  # auto: follow train.dtype (bf16 on CUDA)
    reduce_bucket_size: int = 200_000_000  # elements per gradient reduction
    allgather_bucket_size: int = 200_000_000  # elements per parameter all-gather (ZeRO 1/2)
    overlap_comm: bool = False
    config: str = ""  # a DeepSpeed JSON file merged under the above; it must not set what lctrain derives


@dataclass
class LoraConfig:
    """Low-rank adapters through peft (fine-tuning from checkpoint.init_from); checkpoints then hold only what
    trains. `trainable`: other parameters trained in full, by name part (LongLoRA+: embeddings and norms)."""
    enabled: bool = False
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    trainable: list = field(default_factory=lambda: ["embed", "norm"])


@dataclass
class ConvertConfig:
    """Attention -> hybrid conversion (`lctrain.convert`): the model's shape follows `checkpoint.init_from` (an
    attention model), `pattern` is the target; each layer that turns from `attn` into a linear-family type (G, L)
    or `swa` (S) is initialised from that layer's attention weights. MLPs, norms and embeddings are kept."""
    enabled: bool = False
    pattern: str = ""  # target layer letters, repeated to n_layers; "": every `keep_every`-th layer stays attention
    keep_every: int = 4  # with pattern "": layers keep_every-1, 2*keep_every-1, ... stay `attn`, the rest become `into`
    into: str = "G"  # the letter converted layers take when pattern is ""


@dataclass
class DistillConfig:
    """Knowledge distillation from a frozen teacher (`lctrain.convert.distill`): loss = alpha * tau^2 *
    KL(teacher || student at temperature tau) + (1 - alpha) * cross-entropy, a chunk of tokens at a time."""
    enabled: bool = False
    teacher: str = ""  # run/checkpoint dir or hf:PATH; "": checkpoint.init_from
    alpha: float = 0.5
    tau: float = 1.0
    chunk_tokens: int = 0  # tokens per loss chunk; 0: model.loss_chunk_tokens (0 there too: auto, as the CE)
    align_steps: int = 0  # stage 1: steps of per-layer output alignment (MSE), only converted layers train
    align_lr: float = 1e-3


@dataclass
class LoggingConfig:
    tensorboard: bool = True
    progress: Literal["auto", "bar", "plain", "none"] = "auto"


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    convert: ConvertConfig = field(default_factory=ConvertConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None)


# Value checks beyond types: dotted key -> (predicate, what is allowed).
_RULES: dict[str, tuple[typing.Callable[[Any], bool], str]] = {
    "model.d_model": (lambda v: v > 0, "a positive integer"),
    "model.n_layers": (lambda v: v > 0, "a positive integer"),
    "model.n_heads": (lambda v: v > 0, "a positive integer"),
    "model.n_kv_heads": (lambda v: v >= 0, "0 (same as n_heads) or a positive integer"),
    "model.head_dim": (lambda v: v >= 0, "0 (d_model // n_heads) or a positive integer"),
    "model.ffn_dim": (lambda v: v >= 0, "0 (auto) or a positive integer"),
    "model.vocab_size": (lambda v: v >= 0, "0 (from the tokenizer) or a positive integer"),
    "model.rope_theta": (lambda v: v > 0, "a positive number"),
    "model.norm_eps": (lambda v: v > 0, "a positive number"),
    "model.init_std": (lambda v: v > 0, "a positive number"),
    "model.loss_chunk_tokens": (lambda v: v >= 0, "0 (auto) or a positive integer"),
    "data.vocab_size": (lambda v: v >= 64, "an integer >= 64"),
    "data.tokenizer_sample_chars": (lambda v: v > 0, "a positive integer"),
    "data.seq_len": (lambda v: v >= 2, "an integer >= 2"),
    "data.eval_fraction": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "data.max_documents": (lambda v: v >= 0, "0 (all) or a positive integer"),
    "train.steps": (lambda v: v >= 0, "a non-negative integer"),
    "train.stop_at": (lambda v: v >= 0, "0 (run to train.steps) or a positive step"),
    "train.lr": (lambda v: v > 0, "a positive number"),
    "train.min_lr_ratio": (lambda v: 0 <= v <= 1, "a number in [0, 1]"),
    "train.warmup_steps": (lambda v: v >= 0, "a non-negative integer"),
    "train.decay_fraction": (lambda v: 0 <= v <= 1, "a number in [0, 1]"),
    "train.weight_decay": (lambda v: v >= 0, "a non-negative number"),
    "train.beta1": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "train.beta2": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "train.eps": (lambda v: v > 0, "a positive number"),
    "train.grad_clip": (lambda v: v >= 0, "a non-negative number (0 disables)"),
    "train.micro_batch_size": (lambda v: v > 0, "a positive integer"),
    "train.tokens_per_step": (lambda v: v >= 0, "0 (auto) or a positive integer"),
    "train.eval_interval": (lambda v: v >= 0, "a non-negative integer"),
    "train.eval_batches": (lambda v: v >= 0, "a non-negative integer"),
    "train.log_interval": (lambda v: v > 0, "a positive integer"),
    "train.max_bad_steps": (lambda v: v > 0, "a positive integer"),
    "parallel.sp": (lambda v: v > 0, "a positive integer"),
    "parallel.timeout_s": (lambda v: v > 0, "a positive number of seconds"),
    "checkpoint.interval": (lambda v: v >= 0, "a non-negative integer (0: only at the end)"),
    "checkpoint.keep_last": (lambda v: v > 0, "a positive integer"),
    "deepspeed.zero_stage": (lambda v: 0 <= v <= 3, "0, 1, 2 or 3"),
    "deepspeed.reduce_bucket_size": (lambda v: v > 0, "a positive integer"),
    "lora.r": (lambda v: v > 0, "a positive integer"),
    "lora.alpha": (lambda v: v > 0, "a positive number"),
    "lora.dropout": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "deepspeed.allgather_bucket_size": (lambda v: v > 0, "a positive integer"),
    "convert.keep_every": (lambda v: v > 0, "a positive integer"),
    "distill.alpha": (lambda v: 0 <= v <= 1, "a number in [0, 1]"),
    "distill.tau": (lambda v: v > 0, "a positive number"),
    "distill.chunk_tokens": (lambda v: v >= 0, "0 (model.loss_chunk_tokens) or a positive integer"),
    "distill.align_steps": (lambda v: v >= 0, "a non-negative integer"),
    "distill.align_lr": (lambda v: v > 0, "a positive number"),
}


# ----------------------------------------------------------------------------------------------- parsing
def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if origin is list or tp is list:
        return "a list"
    if origin is dict or tp is dict:
        return "a mapping"
    if _is_dataclass_type(tp):
        return "a mapping"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; return it converted (dataclass sections built recursively)."""
    origin = typing.get_origin(tp)
    if _is_dataclass_type(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} keys, got {value!r}")
        return _build(tp, value, key)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{key}: {value!r} is not allowed; expected one of "
                              f"{', '.join(repr(a) for a in allowed)}{hint}")
        return value
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: expected {_describe(tp)}, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads `1e-3` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if tp is list or origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return list(value)
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    return value


def _build(cls: type, values: dict, prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for name, value in values.items():
        key = f"{prefix}.{name}" if prefix else str(name)
        if name not in names:
            close = difflib.get_close_matches(str(name), names, n=1)
            hint = f"; did you mean '{prefix + '.' if prefix else ''}{close[0]}'?" if close else ""
            where = f"section '{prefix}'" if prefix else "the recipe"
            raise ConfigError(f"{key}: unknown key in {where}{hint} (known: {', '.join(names)})")
        kwargs[name] = _coerce(value, hints[name], key)
    return cls(**kwargs)


def _parse_scalar(text: str) -> Any:
    """An override value is parsed as YAML so `4`, `1e-3`, `true`, `[A, G]` and `{a: 1}` work."""
    try:
        return yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError:
        return text


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(parts[:i + 1])}: is {child!r}, not a section; cannot set {dotted}")
        node = child
    node[parts[-1]] = value


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def read_recipe(path: str | os.PathLike) -> dict:
    """Load a YAML recipe as a plain dict (errors as one-line ConfigError)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe: file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"recipe {path}: YAML syntax error{where}: {exc.problem}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"recipe {path}: YAML syntax error: {exc}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {path}: the top level must be a mapping of sections, got {type(data).__name__}")
    return data


def load_config(path: str | os.PathLike | None, overrides: list[str] = (), base: dict | None = None) -> Config:
    """Recipe file (or `base` dict) + `key=value` overrides -> validated `Config`."""
    tree = read_recipe(path) if path is not None else {}
    if base:
        tree = _merge(base, tree)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected dotted.key=value, e.g. train.steps=20")
        key, text = item.split("=", 1)
        key = key.strip()
        if not key or any(not p for p in key.split(".")):
            raise ConfigError(f"override {item!r}: expected dotted.key=value, e.g. train.steps=20")
        _set_dotted(tree, key, _parse_scalar(text))
    if isinstance(tree.get("checkpoint"), dict) and "async" in tree["checkpoint"]:  # a Python keyword as a field
        tree["checkpoint"] = {("async_save" if k == "async" else k): v for k, v in tree["checkpoint"].items()}
    cfg = _build(Config, tree, "")
    cfg.data.sources = [_coerce(s, SourceConfig, f"data.sources[{i}]") for i, s in enumerate(cfg.data.sources)]
    cfg.data.eval_sources = [_coerce(s, SourceConfig, f"data.eval_sources[{i}]")
                             for i, s in enumerate(cfg.data.eval_sources)]
    if path is not None:
        stem = Path(path).stem
        cfg.run.name = cfg.run.name or stem
    cfg.run.name = cfg.run.name or "run"
    cfg.run.dir = cfg.run.dir or str(Path("runs") / cfg.run.name)
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Value ranges and cross-field checks that types alone cannot express."""
    for dotted, (ok, allowed) in _RULES.items():
        section, name = dotted.split(".")
        value = getattr(getattr(cfg, section), name)
        if not ok(value):
            raise ConfigError(f"{dotted}: {value!r} is not allowed; expected {allowed}")
    m = cfg.model
    if m.head_dim == 0 and m.d_model % m.n_heads:
        raise ConfigError(f"model.n_heads: {m.n_heads} does not divide model.d_model={m.d_model}; "
                          "set model.head_dim or pick a divisor")
    kv = m.n_kv_heads or m.n_heads
    if m.n_heads % kv:
        raise ConfigError(f"model.n_kv_heads: {kv} must divide model.n_heads={m.n_heads}")
    if isinstance(m.pattern, str):
        if not m.pattern:
            raise ConfigError("model.pattern: empty; expected layer letters like 'GGGA' or a list of mixer names")
    elif not m.pattern or not all(isinstance(p, str) and p for p in m.pattern):
        raise ConfigError(f"model.pattern: {m.pattern!r}; expected a string of layer letters or a list of names")
    for i, src in enumerate(cfg.data.sources + cfg.data.eval_sources):
        if src.type == "hf" and not src.name:
            raise ConfigError(f"{_source_key(cfg, i)}.name: empty; an 'hf' source needs a dataset name or a "
                              "save_to_disk directory")
    for i, src in enumerate(cfg.data.sources):
        if src.type not in ("stdlib", "hf") + SYNTHETIC_SOURCES and not src.path:
            raise ConfigError(f"data.sources[{i}].path: empty; a {src.type!r} source needs a file, directory or glob")
        if src.weight <= 0:
            raise ConfigError(f"data.sources[{i}].weight: {src.weight!r} is not allowed; expected a positive number")
        if src.type in SYNTHETIC_SOURCES:
            _validate_synthetic(src, f"data.sources[{i}]", cfg.data.seq_len)
    if not cfg.data.sources:
        raise ConfigError("data.sources: empty; expected at least one source")
    for i, src in enumerate(cfg.data.eval_sources):
        if src.type not in ("stdlib", "hf") + SYNTHETIC_SOURCES and not src.path:
            raise ConfigError(f"data.eval_sources[{i}].path: empty; a {src.type!r} source needs a file, directory "
                              "or glob")
    if cfg.data.num_workers < 0:
        raise ConfigError(f"data.num_workers: {cfg.data.num_workers} is not allowed; expected 0 (the cores "
                          "available) or a positive number of processes")
    if cfg.data.tokenizer and not Path(cfg.data.tokenizer).is_file():
        raise ConfigError(f"data.tokenizer: file not found: {cfg.data.tokenizer}")
    if cfg.train.schedule == "wsd" and cfg.train.warmup_steps > cfg.train.steps:
        raise ConfigError(f"train.warmup_steps: {cfg.train.warmup_steps} exceeds train.steps={cfg.train.steps}")
    _validate_deepspeed(cfg.deepspeed)
    if cfg.checkpoint.async_save and cfg.train.engine != "fsdp":
        raise ConfigError(f"checkpoint.async_save: background saves need train.engine='fsdp' (sharded checkpoints), "
                          f"got {cfg.train.engine!r}")
    _validate_lora(cfg)
    _validate_convert(cfg)
    if m.attn_plan and not Path(m.attn_plan).is_file():
        raise ConfigError(f"model.attn_plan: file not found: {m.attn_plan} (write one with `lctrain moa search`)")
    sp = cfg.parallel.sp
    if sp > 1 and cfg.parallel.attn == "ulysses" and (m.n_heads % sp or kv % sp):
        raise ConfigError(f"parallel.attn: 'ulysses' shards heads, but model.n_heads={m.n_heads} / n_kv_heads={kv} "
                          f"are not divisible by parallel.sp={sp}; use 'allgather' or 'ring'")
    # seq_len need not divide by sp: the sharder pads with masked tokens


def _source_key(cfg: Config, i: int) -> str:
    n = len(cfg.data.sources)
    return f"data.sources[{i}]" if i < n else f"data.eval_sources[{i - n}]"


def _validate_synthetic(src: SourceConfig, key: str, seq_len: int) -> None:
    """Options of a generated source; the token-id range of `mqar` is checked against the tokenizer later."""
    if src.num_examples <= 0:
        raise ConfigError(f"{key}.num_examples: {src.num_examples!r} is not allowed; expected a positive integer")
    if src.length < 0:
        raise ConfigError(f"{key}.length: {src.length!r} is not allowed; expected 0 (data.seq_len - 2) or a "
                          "positive integer")
    length = src.length or seq_len - 2
    if src.type == "mqar":
        if src.num_kv_pairs <= 0:
            raise ConfigError(f"{key}.num_kv_pairs: {src.num_kv_pairs!r} is not allowed; expected a positive integer")
        if src.task_vocab < 4 or src.task_vocab % 2:
            raise ConfigError(f"{key}.task_vocab: {src.task_vocab!r} is not allowed; expected an even integer >= 4")
        if src.num_kv_pairs > src.task_vocab // 2:
            raise ConfigError(f"{key}.num_kv_pairs: {src.num_kv_pairs} distinct keys do not fit in task_vocab/2 = "
                              f"{src.task_vocab // 2} key ids; lower it or raise task_vocab")
        if length < 4 * src.num_kv_pairs:
            raise ConfigError(f"{key}.length: {length} tokens cannot hold {src.num_kv_pairs} pairs and their "
                              f"queries; expected >= 4 * num_kv_pairs = {4 * src.num_kv_pairs} (raise data.seq_len "
                              "or length)")
    elif length < 64:
        raise ConfigError(f"{key}.length: {length} tokens is too short for a passkey prompt; expected >= 64")


def _validate_lora(cfg: Config) -> None:
    lora = cfg.lora
    if not lora.enabled:
        return
    if not cfg.checkpoint.init_from:
        raise ConfigError("lora.enabled: LoRA fine-tunes a trained model; set checkpoint.init_from to a run, a "
                          "checkpoint or hf:PATH")
    if cfg.train.engine not in ("ddp", "fsdp"):
        raise ConfigError(f"lora.enabled: supported with train.engine 'ddp' or 'fsdp', got {cfg.train.engine!r}")
    for key in ("target_modules", "trainable"):
        value = getattr(lora, key)
        if not all(isinstance(v, str) and v for v in value) or (key == "target_modules" and not value):
            raise ConfigError(f"lora.{key}: {value!r}; expected a list of module names like ['q_proj', 'v_proj']")


def _validate_convert(cfg: Config) -> None:
    if cfg.convert.enabled and not cfg.checkpoint.init_from:
        raise ConfigError("convert.enabled: conversion starts from an attention model; set checkpoint.init_from to "
                          "a run, a checkpoint or hf:PATH")
    if cfg.distill.enabled and not (cfg.distill.teacher or cfg.checkpoint.init_from):
        raise ConfigError("distill.teacher: empty and checkpoint.init_from is empty; name the teacher model")
    if cfg.distill.align_steps and not cfg.convert.enabled:
        raise ConfigError("distill.align_steps: layer alignment needs converted layers; set convert.enabled=true "
                          "or distill.align_steps=0")
    if cfg.distill.enabled and cfg.train.engine not in ("ddp", "fsdp"):
        raise ConfigError(f"distill.enabled: distillation runs with train.engine ddp or fsdp; got "
                          f"{cfg.train.engine!r}")
    if cfg.distill.enabled and cfg.lora.enabled:
        raise ConfigError("distill.enabled: distillation with LoRA is not supported; set lora.enabled=false")


def _validate_deepspeed(ds: DeepSpeedConfig) -> None:
    if ds.offload_params != "none" and ds.zero_stage != 3:
        raise ConfigError(f"deepspeed.offload_params: {ds.offload_params!r} needs deepspeed.zero_stage=3 "
                          f"(got {ds.zero_stage})")
    if ds.offload_optimizer != "none" and ds.zero_stage == 0:
        raise ConfigError(f"deepspeed.offload_optimizer: {ds.offload_optimizer!r} needs deepspeed.zero_stage >= 1")
    if ds.config and not Path(ds.config).is_file():
        raise ConfigError(f"deepspeed.config: file not found: {ds.config}")


def resolve_cache_dir(cfg: Config) -> Path:
    if cfg.data.cache_dir:
        return Path(cfg.data.cache_dir)
    env = os.environ.get("LCTRAIN_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lctrain"
