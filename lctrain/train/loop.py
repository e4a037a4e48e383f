"""The training loop, top to bottom: set up, (resume), then step / log / evaluate / checkpoint until done."""
from __future__ import annotations

import contextlib
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lctrain.config import Config, ConfigError
from lctrain.models import LanguageModel
from lctrain.models.flops import flops_per_token, peak_flops
from lctrain.train.batches import BatchPreparer
from lctrain.train.checkpoint import CheckpointManager, load_weights
from lctrain.train.checkpoint_select import latest_hint
from lctrain.train.dist import DistEnv, all_reduce_sum, barrier, init_distributed, shutdown
from lctrain.train.memory import activation_memory_estimate, fsdp_memory_lines, peak_memory_line
from lctrain.train.metrics import MetricsLogger, Progress, Throughput
from lctrain.train.engine import build_engine
from lctrain.train.resume import (apply_recipe, check_compatible, choose_checkpoint, fresh_start_note,
                                  recipe_changes, set_aside_old_metrics, take_run_lock)
from lctrain.train.errors import TrainingAborted
from lctrain.train.signals import StopRequest, agree_on_stop
from lctrain.train.watchdog import RankWatch, is_collective_error


@dataclass
class Layout:
    world: int
    dp: int
    sp: int
    dp_rank: int
    sp_rank: int
    grad_accum: int
    tokens_per_step: int


def plan_layout(cfg: Config, env: DistEnv) -> Layout:
    sp = cfg.parallel.sp
    if env.world_size % sp:
        raise ConfigError(f"parallel.sp: {sp} does not divide the world size {env.world_size}")
    dp = env.world_size // sp
    per_micro = cfg.train.micro_batch_size * cfg.data.seq_len * dp
    if cfg.train.tokens_per_step == 0:
        accum = 1
    elif cfg.train.tokens_per_step % per_micro:
        raise ConfigError(f"train.tokens_per_step: {cfg.train.tokens_per_step} is not a multiple of "
                          f"micro_batch_size * seq_len * dp = {cfg.train.micro_batch_size} * {cfg.data.seq_len} * "
                          f"{dp} = {per_micro}")
    else:
        accum = cfg.train.tokens_per_step // per_micro
    return Layout(env.world_size, dp, sp, env.rank // sp, env.rank % sp, accum, per_micro * accum)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Trainer:
    def __init__(self, cfg: Config, env: DistEnv, dry_run: bool = False):
        self.cfg, self.env = cfg, env
        self.layout = plan_layout(cfg, env)
        self.main = env.is_main
        self.run_dir = Path(cfg.run.dir)
        seed_everything(cfg.train.seed)  # same seed on every rank: identical initial weights
        if cfg.checkpoint.init_from.startswith("hf:"):
            from lctrain.export.hf_import import follow_hf_checkpoint
            follow_hf_checkpoint(cfg, cfg.checkpoint.init_from[3:])  # model shape (and tokenizer) from the checkpoint
        elif cfg.checkpoint.init_from:
            from lctrain.export.run_files import follow_run_checkpoint
            follow_run_checkpoint(cfg, cfg.checkpoint.init_from)  # likewise from an lctrain run or checkpoint
        teacher_cfg = None
        if cfg.convert.enabled:  # the recipe's model now describes the source; turn it into the hybrid
            from lctrain.convert.layers import convert_model_config
            teacher_cfg = convert_model_config(cfg.model, cfg.convert)

        from lctrain.data import build_data  # imported late: datasets is slow to import
        self.data = build_data(cfg, dp_rank=self.layout.dp_rank, dp_size=self.layout.dp, progress=self.main,
                               batches_per_step=self.layout.grad_accum, tokenize=not dry_run)
        vocab = self.data.tokenizer.vocab_size
        if cfg.model.vocab_size == 0:
            cfg.model.vocab_size = vocab
        elif cfg.model.vocab_size < vocab:
            raise ConfigError(f"model.vocab_size: {cfg.model.vocab_size} is smaller than the tokenizer's {vocab}")

        self.init_source = None  # fsdp: checkpoint.init_from read piece by piece as the engine materialises
        if cfg.train.engine == "fsdp" and cfg.checkpoint.init_from and teacher_cfg is None:
            from lctrain.train.meta_source import open_source
            self.init_source = open_source(cfg.checkpoint.init_from)  # None: loaded whole on the host
        if cfg.train.engine == "fsdp" and (not cfg.checkpoint.init_from or self.init_source is not None):
            from lctrain.models.init import parameters_on_meta
            with parameters_on_meta():  # the engine shards it, then materialises it shard by shard
                self.model = LanguageModel(cfg.model)
        else:
            self.model = LanguageModel(cfg.model).to(env.device)
        self.autocast_dtype = self._autocast_dtype()
        self.teacher = self.distiller = None
        if teacher_cfg is not None:
            self._convert_from(cfg.checkpoint.init_from, teacher_cfg)
        elif cfg.checkpoint.init_from:
            self._init_from(cfg.checkpoint.init_from)
        if cfg.distill.enabled:
            self._build_distiller()
        self.compiled = None
        if cfg.model.compile:  # after LoRA and weights, before DDP/DeepSpeed wrap the model
            from lctrain.models.compile import compile_blocks
            self.compiled = compile_blocks(self.model, cfg.model.compile_backend)
        self.batches = BatchPreparer(cfg, env, self.layout)

    def _init_from(self, source: str) -> None:
        if self.init_source is not None:  # on meta: checked now, read by the fsdp engine piece by piece
            from lctrain.train.meta_source import check
            check(self.model, self.init_source)
            self.model._init_source = self.init_source
        else:
            load_weights(self.model, source)  # hf:PATH, a run, a checkpoint (a LoRA one merged with its base)
        if self.cfg.lora.enabled:  # adapters after the base weights: LoRA B = 0 leaves the model unchanged
            from lctrain.models.init import parameters_on_meta
            from lctrain.train.checkpoint import describe_base
            from lctrain.train.lora import apply_lora
            with parameters_on_meta() if self.init_source is not None else contextlib.nullcontext():
                self.model = apply_lora(self.model, self.cfg.lora)
            self.model._lora_base = describe_base(source)

    def _teacher_dtype(self):
        return self.autocast_dtype if self.env.device.type == "cuda" else None

    def _convert_from(self, source: str, teacher_cfg) -> None:
        """Attention source -> hybrid student: shared weights copied, converted layers initialised from the
        attention they replace (lctrain.convert.layers)."""
        from lctrain.convert.layers import init_from_attention
        from lctrain.convert.teacher import build_teacher
        self.teacher = build_teacher(source, teacher_cfg, self.env.device, None)
        converted = init_from_attention(self.model, self.teacher)
        if self.teacher is not None and self._teacher_dtype() is not None:
            self.teacher = self.teacher.to(self._teacher_dtype())
        if self.main:
            print(f"converted layers {converted} of {source} into {self.cfg.model.pattern}", flush=True)

    def _build_distiller(self) -> None:
        from lctrain.convert.distill import Distiller
        from lctrain.convert.teacher import build_teacher, teacher_model_config
        source = self.cfg.distill.teacher or self.cfg.checkpoint.init_from
        if self.teacher is None or source != self.cfg.checkpoint.init_from:
            self.teacher = build_teacher(source, teacher_model_config(source, self.cfg.model.vocab_size),
                                         self.env.device, self._teacher_dtype())
        self.distiller = Distiller(self.teacher, self.cfg.distill, self.cfg.model.loss_chunk_tokens)

    def _calibrate(self) -> None:
        """Fit the converted layers' per-head output scales on the first training batch (the loader is rewound,
        so training still starts with that batch)."""
        from lctrain.convert.calibrate import calibrate_output_scales
        from lctrain.convert.layers import converted_layers
        position = self.data.train.state_dict()
        batch = next(self.data.train)
        self.data.train.load_state_dict(position)
        inputs, ctx = self.batches.prepare(batch)
        scales = calibrate_output_scales(self.model, self.teacher, converted_layers(self.model), inputs["input_ids"],
                                         ctx, lambda t: all_reduce_sum(t, self.env))
        if self.main:
            shown = ", ".join(f"{i}: [{', '.join(f'{v:.2f}' for v in s.tolist())}]" for i, s in scales.items())
            print(f"calibrated per-head output scales of converted layers {{{shown}}}", flush=True)

    def _align(self) -> list[dict]:
        """Stage 1 of a conversion (distill.align_steps): converted layers regress onto the attention outputs.
        Runs on the bare model before an engine wraps or shards it; returns the metrics records (steps <= 0),
        which the loop writes once the run directory is set up."""
        from lctrain.convert.align import align_layers
        from lctrain.convert.layers import converted_layers
        steps = self.cfg.distill.align_steps
        records = []

        def report(k: int, mse: float) -> None:
            records.append({"step": k - steps, "stage": "align", "align_mse": mse})
            if self.main and (k % self.cfg.train.log_interval == 0 or k == steps):
                print(f"align {k}/{steps} mse {mse:.5f}", flush=True)

        def autocast():
            return (torch.autocast(self.env.device.type, dtype=self.autocast_dtype) if self.autocast_dtype
                    else contextlib.nullcontext())

        align_layers(self.model, self.teacher, converted_layers(self.model), lambda: next(self.data.train),
                     self.batches.prepare, steps, self.cfg.distill.align_lr, self.env, autocast, report)
        return records

    def _autocast_dtype(self):
        choice = self.cfg.train.dtype
        if choice == "bfloat16" or (choice == "auto" and self.env.device.type == "cuda"):
            return torch.bfloat16
        return None

    # ------------------------------------------------------------------------------------------------ reporting
    def summary(self) -> str:
        m, lay = self.model, self.layout
        act = activation_memory_estimate(self.cfg, m, self.env.device.type)
        pattern = "".join({"attn": "A"}.get(t, t[0].upper()) for t in m.layer_types)
        return "\n".join([
            f"parameters: {m.num_parameters():,} ({m.num_parameters(exclude_embedding=True):,} without embeddings)",
            f"layers: {len(m.layer_types)} pattern {pattern} ({', '.join(f'{t}x{m.layer_types.count(t)}' for t in dict.fromkeys(m.layer_types))})",
            f"world: {lay.world} = dp {lay.dp} x sp {lay.sp}; micro-batch {self.cfg.train.micro_batch_size} x "
            f"{self.cfg.data.seq_len} tokens",
            f"tokens per step: {lay.tokens_per_step:,} (gradient accumulation {lay.grad_accum})",
            *([f"LoRA r={self.cfg.lora.r}: {sum(p.numel() for p in m.parameters() if p.requires_grad):,} "
               "parameters train"] if self.cfg.lora.enabled else []),
            f"activation memory (estimate, per process): {act / 2**30:.2f} GiB"
            f"{' with activation checkpointing' if self.cfg.model.activation_checkpointing else ''}",
            peak_memory_line(self.cfg, m, lay.world, self.env.device.type),
            self.data.summary(),
            *(fsdp_memory_lines(self.cfg, m, sorted({lay.world, 8, 64})) if self.cfg.train.engine == "fsdp" else []),
        ])

    # ------------------------------------------------------------------------------------------------ steps
    def _forward_sum(self, model, batch) -> tuple[torch.Tensor, torch.Tensor]:
        inputs, ctx = self.batches.prepare(batch)
        ac = (torch.autocast(self.env.device.type, dtype=self.autocast_dtype) if self.autocast_dtype
              else contextlib.nullcontext())
        with ac:
            if self.distiller is not None and model.training:
                return self.distiller.loss_sum(model, inputs, ctx)
            out = model(inputs["input_ids"], labels=inputs["labels"], ctx=ctx)
        return out.loss_sum, out.n_targets

    def evaluate(self, engine) -> dict:
        batches = self.data.eval_batches(self.cfg.train.eval_batches)
        if not batches:
            return {}
        model = engine.eval_model
        model.eval()
        # Each DP rank evaluates its share, unless every forward is collective (ZeRO-3): then all ranks run all.
        share = engine.eval_shares_batches
        total = torch.zeros(2, dtype=torch.float64, device=self.env.device)
        with torch.no_grad():
            for i, batch in enumerate(batches):
                if share and i % self.layout.dp != self.layout.dp_rank:
                    continue
                loss_sum, n = self._forward_sum(model, batch)
                total += torch.stack([loss_sum.double(), n.double()])
        all_reduce_sum(total, self.env)
        if not share:
            total /= self.layout.dp
        model.train()
        if total[1] == 0:
            return {}
        loss = (total[0] / total[1]).item()
        return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0))}

    def run(self) -> int:
        # One run per run dir: the lock comes before anything in the run dir is written, and goes last.
        lock, writer = take_run_lock(self.run_dir, self.env, log=lambda line: print(line, flush=True))
        try:
            return self._run(writer)
        finally:
            if lock is not None:
                lock.release()

    def _run(self, writer: str) -> int:
        cfg, env, lay = self.cfg, self.env, self.layout
        ckpt = CheckpointManager(self.run_dir, cfg.checkpoint.keep_last, env.rank, env.world_size, writer=writer)
        fpt = flops_per_token(self.model, cfg.data.seq_len)  # before an engine may partition the weights
        # Choose, check and load the checkpoint before writing anything: a refused resume leaves the run dir as is.
        chosen = choose_checkpoint(ckpt, env, cfg.checkpoint.resume)
        latest, notes = chosen.path, chosen.notes()
        align_records = []
        if latest is None and cfg.convert.enabled:  # a fresh conversion, on the bare model before any engine:
            self._calibrate()  # per-head output scales, then stage 1 (if asked)
            align_records = self._align() if cfg.distill.align_steps else []
        engine = build_engine(self.model, cfg, env, lay)  # DDP, DeepSpeed or FSDP: optimizer, schedule, reduction
        if self.teacher is not None and engine.name == "fsdp":
            engine.shard_frozen(self.teacher)  # the teacher is sharded like the student
        step, tokens_seen, skipped = 0, 0, 0
        if latest is not None:
            check_compatible(cfg, latest, self.data.tokenizer, self.run_dir)
            from lctrain.train.elastic import load_resized, saved_world_size
            saved_world = saved_world_size(latest)
            # the data position is global: another world size continues it (fsdp's DCP state reshards on its own)
            resized = saved_world not in (None, lay.world)
            if resized and engine.name != "fsdp":
                state, data_state = load_resized(latest, engine, env.rank, lay.world)
            else:
                state, data_state = engine.load(ckpt, latest)
            if resized:
                notes.append(f"resuming {latest} (written by {saved_world} processes) on {lay.world}: the data "
                             "continues from the saved global position")
            engine.scheduler.load_state_dict(state["scheduler"])
            apply_recipe(engine.optimizer, engine.scheduler, cfg.train)  # the recipe wins for hyperparameters
            notes += recipe_changes(cfg.train, latest)
            if cfg.checkpoint.reset_data:
                notes.append("checkpoint.reset_data=true: the data starts again from its beginning")
            else:
                self.data.train.load_state_dict(data_state)
            step, tokens_seen, skipped = state["step"], state["tokens"], state["skipped_steps"]
        else:
            notes += [n for n in [fresh_start_note(ckpt, cfg.checkpoint.resume)] if n]
        if self.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(cfg.to_yaml())
            self.data.tokenizer.save(self.run_dir / "tokenizer")  # the run dir alone is enough to export/load
            print(self.summary(), flush=True)
            if latest is None:
                notes += [n for n in [set_aside_old_metrics(self.run_dir)] if n]
            for line in notes:
                print(line, flush=True)
            if latest is not None:
                print(f"resumed from {latest} at step {step}", flush=True)
        ckpt.clean_partial()
        model = engine.model
        model.train()

        metrics = MetricsLogger(str(self.run_dir), self.main, cfg.logging.tensorboard,
                                resume_step=step if latest is not None else None)
        for record in align_records:
            metrics.log(record)
        progress = Progress(cfg.logging.progress, cfg.train.steps, step, self.main)
        stop = StopRequest().install()
        watch = RankWatch(env.rank, env.world_size, cfg.parallel.timeout_s).start() if env.distributed else None
        throughput = Throughput()
        peak = peak_flops(torch.cuda.get_device_name(env.device)) if env.device.type == "cuda" else None
        first_record = True
        bad_in_a_row = 0
        saved_at = step if latest is not None else -1
        step_t0 = time.perf_counter()

        def finish_saves() -> None:
            """A background (async) save completes its checkpoint here: collective, and it may wait on the write."""
            finish = getattr(engine, "finish_saves", None)
            if finish is None:
                return
            if watch is not None:
                watch.paused = True
            try:
                finish()
            finally:
                if watch is not None:
                    watch.paused = False

        def save(at_step: int) -> None:
            trainer_state = {"step": at_step, "tokens": tokens_seen, "skipped_steps": skipped,
                             "scheduler": engine.scheduler.state_dict(), "dp": lay.dp, "sp": lay.sp}
            if watch is not None:
                watch.paused = True  # a large save may outlast the hang deadline; its collectives stay bounded
            try:
                path = engine.save(ckpt, at_step, trainer_state, self.data.train.state_dict(), cfg.to_yaml(),
                                   lambda: barrier(env))
            finally:
                if watch is not None:
                    watch.paused = False
                    watch.progress(at_step, 2)
            if self.main:
                progress.write(f"saved {path}")

        def save_unless_streak(at_step: int, why: str) -> bool:
            """No checkpoint in the middle of a non-finite streak: the last good one stays the newest."""
            if bad_in_a_row:
                if self.main:
                    progress.write(f"step {at_step}: {why} checkpoint not saved during a non-finite streak "
                                   f"({bad_in_a_row} in a row)")
                return False
            save(at_step)
            return True

        try:
            while step < cfg.train.steps:
                if watch is not None:
                    watch.progress(step)
                micro = [next(self.data.train) for _ in range(lay.grad_accum)]
                # Normalise by the target tokens of the whole step across DP x SP, not per micro-batch.
                local_targets = sum(int(self.batches.local_targets(b)) for b in micro)
                n_global = all_reduce_sum(torch.tensor([float(local_targets)], dtype=torch.float64,
                                                       device=env.device), env).item()
                loss_total = torch.zeros((), dtype=torch.float64, device=env.device)
                for i, batch in enumerate(micro):
                    with engine.micro_step(last=i == lay.grad_accum - 1):  # gradients reduced on the last one
                        loss_sum, _ = self._forward_sum(model, batch)
                        # Engines average gradients over the world; scale back so the result is sum / n_global.
                        engine.backward(loss_sum, lay.world / max(n_global, 1.0))
                    loss_total += loss_sum.detach().double()
                all_reduce_sum(loss_total, env)
                loss = loss_total.item() / max(n_global, 1.0)
                distill_metrics = ({} if self.distiller is None else
                                   self.distiller.step_metrics(n_global, lambda t: all_reduce_sum(t, env)))
                lr = engine.lr
                grad_norm, applied = engine.step(loss)  # clip, then update (DDP skips non-finite steps)
                if math.isfinite(loss) and math.isfinite(grad_norm):
                    bad_in_a_row = 0
                else:
                    skipped += 0 if applied else 1
                    bad_in_a_row += 1
                    if self.main:
                        progress.write(f"step {step + 1}: non-finite loss {loss} / grad norm {grad_norm}; "
                                       f"step {'applied' if applied else 'skipped'} ({bad_in_a_row} in a row)")
                    if bad_in_a_row >= cfg.train.max_bad_steps:
                        raise TrainingAborted(
                            f"{bad_in_a_row} non-finite steps in a row (train.max_bad_steps="
                            f"{cfg.train.max_bad_steps}); last good checkpoint kept; lower train.lr or check data")
                step += 1
                tokens_seen += lay.tokens_per_step
                if self.compiled is not None and self.main:
                    self.compiled.after_step(progress.write, last=step == cfg.train.steps)
                throughput.add(lay.tokens_per_step)

                if step % cfg.train.log_interval == 0 or step == cfg.train.steps:
                    tps = throughput.rate()
                    record = {"step": step, "loss": loss, "lr": lr, "tokens": tokens_seen, "grad_norm": grad_norm,
                              "tokens_per_s": tps, "skipped_steps": skipped,
                              "step_time_s": (time.perf_counter() - step_t0) / cfg.train.log_interval}
                    record.update(self.batches.comm_stats())
                    record.update(distill_metrics)
                    if env.device.type == "cuda":
                        record["max_reserved_gib"] = torch.cuda.max_memory_reserved(env.device) / 2**30
                        record["max_allocated_gib"] = torch.cuda.max_memory_allocated(env.device) / 2**30
                        if peak:
                            record["mfu"] = tps * fpt / (peak * lay.world)
                    if first_record:
                        record.update({"world_size": lay.world, "dp": lay.dp, "sp": lay.sp})
                        if self.data.bad_records:  # data.on_bad_record=skip: how many were left out
                            record["data_skipped_records"] = sum(self.data.bad_records.values())
                        first_record = False
                    metrics.log(record)
                    progress.update(step, record)
                    step_t0 = time.perf_counter()

                if cfg.train.eval_interval and step % cfg.train.eval_interval == 0 and step < cfg.train.steps:
                    result = self.evaluate(engine)
                    if result:
                        metrics.log({"step": step, **result})
                        progress.write(f"step {step} eval_loss {result['eval_loss']:.4f} "
                                       f"eval_ppl {result['eval_ppl']:.2f}")

                if watch is not None:
                    watch.progress(step, 1)
                signalled = agree_on_stop(stop.signum, env)  # the same reason on every rank
                stop_now = signalled is not None or step == cfg.train.stop_at
                interval_hit = cfg.checkpoint.interval and step % cfg.checkpoint.interval == 0
                saved = saved_at == step
                if (interval_hit or stop_now or step == cfg.train.steps) and not saved:
                    saved = save_unless_streak(step, "interval" if not stop_now else "stop")
                    saved_at = step if saved else saved_at
                if stop_now:
                    finish_saves()
                    if self.main:
                        why = signalled or f"train.stop_at={cfg.train.stop_at}"
                        kept = (f"checkpoint saved at step {step}" if saved else
                                f"no checkpoint saved; the newest is {latest_hint(ckpt.root) or 'none'}")
                        progress.write(f"stopped ({why}): {kept}")
                    return 0

            result = self.evaluate(engine)
            if result:
                metrics.log({"step": step, **result})
                if self.main:
                    progress.write(f"final eval_loss {result['eval_loss']:.4f} eval_ppl {result['eval_ppl']:.2f}")
            if saved_at != step:
                save_unless_streak(step, "final")
            finish_saves()
            return 0
        except RuntimeError as exc:
            if watch is None or isinstance(exc, TrainingAborted) or not is_collective_error(exc):
                raise
            raise watch.explain(exc, f"step {step + 1}") from None
        finally:
            if watch is not None:
                watch.stop()
            progress.close()
            metrics.close()
            stop.restore()


def train(cfg: Config, dry_run: bool = False) -> int:
    env = init_distributed(cfg.parallel.backend, timeout_s=cfg.parallel.timeout_s)
    finished = False
    trainer = None
    try:
        sp = cfg.parallel.sp
        if dry_run and env.world_size % sp:  # a plan on fewer processes than one SP group: data laid out as sp=1
            cfg.parallel.sp = 1
        trainer = Trainer(cfg, env, dry_run=dry_run)
        cfg.parallel.sp = sp  # the summary's memory estimate is for the recipe's layout
        if dry_run:
            if env.is_main:
                print(trainer.summary(), flush=True)
            code = 0
        else:
            code = trainer.run()
        finished = True
        return code
    finally:
        trainer = None  # DDP and the optimizer hold the process group: free them so destroying it joins gloo's threads
        shutdown(env, together=finished)
