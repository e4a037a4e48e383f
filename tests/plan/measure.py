"""Measured peak tensor memory of training steps on CPU, with torch's own MemTracker (a dispatch-mode tracker of
every live tensor's storage: the CPU counterpart of `torch.cuda.max_memory_allocated`)."""
from __future__ import annotations

import contextlib

import torch

from lctrain.config import load_config
from lctrain.models import LanguageModel
from lctrain.train.optim import build_optimizer
from tests.plan.kernel_ops import RECURRENT_OPS, IntoKernelOps


def packed_batch(rows: int, seq_len: int, vocab: int, doc_len: int, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (rows, seq_len), generator=gen)
    positions = (torch.arange(seq_len) % doc_len).expand(rows, seq_len).contiguous()
    return {"input_ids": ids, "labels": ids.roll(-1, dims=1), "position_ids": positions}


def measured_peak_bytes(overrides: list[str], rows: int, seq_len: int, doc_len: int,
                        kernel_ops: tuple = RECURRENT_OPS, bf16: bool = False) -> int:
    """Peak bytes of live tensors over the second of two training steps (optimizer state exists then);
    allocations inside the `kernel_ops` count. `bf16`: forward under bf16 autocast, as the trainer runs it."""
    cfg = load_config(None, overrides)
    torch.manual_seed(0)
    model = LanguageModel(cfg.model).train()
    return second_step_peak_bytes(model, cfg, packed_batch(rows, seq_len, cfg.model.vocab_size, doc_len),
                                  kernel_ops, bf16)


def second_step_peak_bytes(model, cfg, batch, kernel_ops: tuple = RECURRENT_OPS, bf16: bool = False,
                           context=contextlib.nullcontext) -> int:
    """MemTracker's peak over the second of two AdamW training steps of `model` on `batch`; `context()` is entered
    around the tracked step."""
    from torch.distributed._tools.mem_tracker import MemTracker
    optimizer = build_optimizer(model, cfg.train)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(batch["input_ids"], batch["position_ids"], labels=batch["labels"])
        (out.loss_sum / out.n_targets).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    step()
    tracker = MemTracker()
    tracker.track_external(model, optimizer)
    with tracker, IntoKernelOps(kernel_ops), context():  # the recurrent ops' inner tensors count, as on a device
        step()
    peak = tracker.get_tracker_snapshot("peak")
    return int(sum(v["Total"] for v in peak.values()))
