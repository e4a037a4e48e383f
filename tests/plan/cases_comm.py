"""Gloo cases: the bytes `lctrain.parallel.comm` counts in a real forward + backward of a hybrid model under SP
equal the planner's bytes for the same configuration, per layer type and per rank.

Model: gdn, linear, gated-conv and GQA attention layers (every kind of SP traffic: LASP-2 summaries, conv halos,
attention collectives), packed documents crossing shard boundaries, a length that is not a multiple of the shards.
"""
from __future__ import annotations

import torch

from lctrain.config import load_config
from lctrain.models import BatchContext, LanguageModel
from lctrain.parallel import comm, init_sp_groups, shard_batch
from lctrain.plan.candidate import Candidate, Workload
from lctrain.plan.comm import KINDS, sp_bytes_per_micro_step
from lctrain.plan.shape import model_shape
from tests.parallel.util import packed_positions

VOCAB, ROWS = 61, 2
DOCS = [[7, 1, 20, 30], [3, 33, 40]]


def _config(seq_len: int, kv_heads: int, checkpointing: bool):
    return load_config(None, [f"model.vocab_size={VOCAB}", "model.d_model=16", "model.n_heads=4",
                              f"model.n_kv_heads={kv_heads}", "model.n_layers=4", "model.pattern=GLCA",
                              "model.ffn_dim=32", "model.loss_chunk_tokens=16", f"data.seq_len={seq_len}",
                              f"model.activation_checkpointing={str(checkpointing).lower()}",
                              "model.mixers={gdn: {head_k_dim: 4, head_v_dim: 8}, conv: {kernel_size: 3}}"])


def _case(attn: str, layout: str, checkpointing: bool, sp: int | None = None, dtype=torch.float32):
    def run(world_groups):
        size = sp or world_groups.world_size
        if world_groups.world_size % size or (sp is not None and size == world_groups.world_size):
            return                      # dp x sp cases only where they differ from the whole-world one
        groups = world_groups if size == world_groups.world_size else init_sp_groups(size)
        length = 6 * size + 5
        cfg = _config(length, 4 if attn == "ulysses" else 2, checkpointing)
        torch.manual_seed(0)
        model = LanguageModel(cfg.model).to(dtype).train()
        gen = torch.Generator().manual_seed(3)
        batch = {"input_ids": torch.randint(0, VOCAB, (ROWS, length), generator=gen),
                 "labels": torch.randint(0, VOCAB, (ROWS, length), generator=gen),
                 "position_ids": packed_positions(ROWS, length, DOCS)}
        local, placement = shard_batch(batch, groups.sp_rank, size, layout, groups=groups, attention_mode=attn)
        ctx = BatchContext.from_positions(local["position_ids"], sp=placement)
        comm.comm_stats(reset=True)
        out = model(local["input_ids"], labels=local["labels"], ctx=ctx)
        out.loss_sum.backward()
        counted = comm.comm_stats(reset=True)

        cand = Candidate(world=groups.world_size, sp=size, attn=attn, layout=layout, engine="ddp",
                         activation_checkpointing=checkpointing, micro_batch_size=ROWS)
        work = Workload(seq_len=length, tokens_per_step=ROWS * length * groups.dp_size,
                        dtype_bytes=torch.finfo(dtype).bits // 8, mixed_precision=False)
        planned = sp_bytes_per_micro_step(model_shape(cfg), cand, work, rank=groups.sp_rank)
        for kind in KINDS:
            assert counted[f"comm_bytes_{kind}"] == planned[kind], (kind, groups.sp_rank, counted, planned)
            assert planned[kind] > 0, (kind, planned)       # every kind travels on every rank here
    return run


# the default run: every attention mode, both layouts, checkpointing on and off, dp x sp
FAST = {f"{attn}_{layout}_{'ckpt' if ckpt else 'plain'}": _case(attn, layout, ckpt)
        for attn, layout, ckpt in [("allgather", "contiguous", False), ("ring", "zigzag", True),
                                   ("ulysses", "zigzag", False), ("ulysses", "contiguous", True)]}
FAST["allgather_zigzag_dp2_sp2"] = _case("allgather", "zigzag", True, sp=2)
# the rest of the grid and float64 (wider states and ring dK/dV) run with -m slow
SLOW = {f"{attn}_{layout}_{'ckpt' if ckpt else 'plain'}": _case(attn, layout, ckpt)
        for attn in ("allgather", "ring", "ulysses") for layout in ("contiguous", "zigzag") for ckpt in (False, True)}
SLOW = {name: case for name, case in SLOW.items() if name not in FAST}
SLOW["ring_zigzag_float64"] = _case("ring", "zigzag", False, dtype=torch.float64)
SLOW["ulysses_contiguous_dp2_sp2"] = _case("ulysses", "contiguous", False, sp=2)
CASES = {**FAST, **SLOW}
