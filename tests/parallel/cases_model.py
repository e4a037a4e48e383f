"""Whole-model cases: loss and every parameter gradient of a tiny hybrid under SP (and DP x SP) equal one device.

Model: gdn, linear and GQA attention layers (short convolutions included), float64. Rows hold packed documents
that cross shard boundaries, and the length is not a multiple of the shard count. Recurrent states (and LASP-2's
state summaries) are fp32 by contract, so agreement is to ~1e-9 rather than float64 round-off.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from lctrain.config import load_config
from lctrain.models import BatchContext, LanguageModel
from lctrain.parallel import init_sp_groups, loss_normalizer, shard_batch
from tests.parallel.util import assert_close, packed_positions

VOCAB = 61
TOL = 1e-7
DOCS = [[7, 1, 20, 30], [3, 33, 40], [25, 12, 2], [50]]


def _model(kv_heads: int = 2) -> LanguageModel:
    cfg = load_config(None, [f"model.vocab_size={VOCAB}", "model.d_model=16", "model.n_heads=4",
                             f"model.n_kv_heads={kv_heads}",
                             "model.n_layers=4", "model.pattern=GLGA", "model.ffn_dim=32",
                             "model.loss_chunk_tokens=16", "model.mixers={gdn: {head_k_dim: 4, head_v_dim: 8}}"])
    torch.manual_seed(0)
    return LanguageModel(cfg.model).double()


def _batch(rows: int, length: int) -> dict:
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(0, VOCAB, (rows, length), generator=gen)
    labels = torch.randint(0, VOCAB, (rows, length), generator=gen)
    labels[torch.rand(rows, length, generator=gen) < 0.2] = -100
    return {"input_ids": ids, "labels": labels, "position_ids": packed_positions(rows, length, DOCS[:rows])}


def _case(sp: int, layout: str, attn: str):
    def run(world_groups):
        world = world_groups.world_size
        if world % sp:
            return
        groups = world_groups if sp == world else init_sp_groups(sp)
        dp = world // sp
        rows_per_replica = 4 // dp
        length = 6 * sp + 5  # not a multiple of the shard count
        batch = _batch(4, length)

        kv_heads = 4 if attn == "ulysses" else 2  # Ulysses shards heads: kv heads must divide by sp
        reference = _model(kv_heads)
        out = reference(batch["input_ids"], batch["position_ids"], labels=batch["labels"])
        (out.loss_sum / out.n_targets).backward()

        model = _model(kv_heads)
        mine = {k: v[groups.dp_rank * rows_per_replica:(groups.dp_rank + 1) * rows_per_replica]
                for k, v in batch.items()}
        local, placement = shard_batch(mine, groups.sp_rank, groups.sp_size, layout, groups=groups,
                                       attention_mode=attn)
        ctx = BatchContext.from_positions(local["position_ids"], sp=placement)
        res = model(local["input_ids"], labels=local["labels"], ctx=ctx)
        n_global = loss_normalizer(local["labels"], groups)
        (res.loss_sum / n_global).backward()
        loss = res.loss_sum.detach().clone()
        dist.all_reduce(loss)
        assert int(n_global) == int(out.n_targets)
        assert_close(loss / n_global, (out.loss_sum / out.n_targets).detach(), "loss", TOL)
        for (name, p), p_ref in zip(model.named_parameters(), reference.parameters()):
            grad = p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
            dist.all_reduce(grad)  # what DDP's world average does, times the world size
            assert_close(grad, p_ref.grad, f"grad {name}", TOL)
    return run


CASES = {
    f"sp{sp}_{layout}_{attn}": _case(sp, layout, attn)
    for sp, layout, attn in [("W", "contiguous", "allgather"), ("W", "zigzag", "ring"), ("W", "zigzag", "ulysses"),
                             ("W", "contiguous", "ring"), (2, "zigzag", "allgather")]
}


def _resolve(cases: dict) -> dict:
    """'W' means the whole world as one SP group; 2 on a world of 4 is DP 2 x SP 2."""
    out = {}
    for name, (sp, layout, attn) in zip(cases, [(k.split("_")[0][2:], *k.split("_")[1:]) for k in cases]):
        def run(groups, sp=sp, layout=layout, attn=attn):
            size = groups.world_size if sp == "W" else int(sp)
            if sp != "W" and size == groups.world_size:
                return  # covered by the whole-world case
            _case(size, layout, attn)(groups)
        out[name] = run
    return out


CASES = _resolve(CASES)
