"""Distributed cases for the Taylor (BASED), sliding-window, Titans and landmark SP paths against the
single-process ops and mixers (outputs and every gradient), and whole-model cases for hybrids of those mixers."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from lctrain.models.context import cu_seqlens_from_positions
from lctrain.parallel import gather_sequence, shard_batch, sp_local_attention, sp_taylor_linear_attention
from tests.parallel.util import assert_close, leaves, packed_positions

HEADS, KV_HEADS, FEATURE, VALUE = 2, 1, 3, 4
# documents crossing chunk (and rank) boundaries, tiny ones, and (row 1) a row starting mid-document
DOCS = [[5, 9, 1, 2, 11, 40], [3, 17, 1, 30]]


def _positions(rows: int, length: int) -> torch.Tensor:
    positions = packed_positions(rows, length, DOCS)
    positions[1] += 4
    positions[1, 3:] = packed_positions(1, length - 3, [DOCS[1]])[0]
    return positions


def _flat(x):
    return x.reshape((1, -1) + tuple(x.shape[2:]))


def _length(groups, extra: int = 3) -> int:
    return 6 * groups.sp_size + extra       # not a multiple of the chunk count: padding is exercised


def _compare(groups, layout, batch, names, reference, distributed):
    """Run `reference(full leaves)` and `distributed(local leaves, local batch, placement)`; compare the outputs
    and the gradients of every leaf."""
    full = leaves(batch, names)
    o_ref = reference(full)
    (o_ref * batch["grad"]).sum().backward()
    local, placement = shard_batch(batch, groups.sp_rank, groups.sp_size, layout, groups=groups)
    mine = leaves(local, names)
    o = distributed(mine, local, placement)
    (o * local["grad"]).sum().backward()
    assert_close(gather_sequence(o.detach(), placement), o_ref.detach(), "output")
    for name in names:
        assert_close(gather_sequence(mine[name].grad, placement), full[name].grad, f"d{name}")


def _qkv_batch(rows: int, length: int, kv_heads: int, dim: int) -> dict:
    """Packed positions, float64 q `[B, T, HEADS, dim]`, k `[B, T, kv_heads, dim]`, v and the output gradient."""
    shape = (rows, length)
    return {"position_ids": _positions(rows, length),
            "q": torch.randn(*shape, HEADS, dim, dtype=torch.float64),
            "k": torch.randn(*shape, kv_heads, dim, dtype=torch.float64),
            "v": torch.randn(*shape, kv_heads, VALUE, dtype=torch.float64),
            "grad": torch.randn(*shape, HEADS, VALUE, dtype=torch.float64)}


# ------------------------------------------------------------------------------------------------ Taylor
def _taylor(groups, layout: str, normalize: bool = True, backend: str = "naive", use_cu: bool = False):
    from lctrain.kernels import taylor_linear_attention as op
    length = _length(groups)
    rows = 2
    batch = _qkv_batch(rows, length, HEADS, FEATURE)
    positions = batch["position_ids"]

    def reference(full):
        o, _ = op(*[_flat(full[n]) for n in "qkv"], normalize=normalize,
                  cu_seqlens=cu_seqlens_from_positions(positions), backend=backend)
        return o.reshape(rows, length, HEADS, VALUE)

    def distributed(mine, local, placement):
        cu = cu_seqlens_from_positions(local["position_ids"]) if use_cu else None
        return sp_taylor_linear_attention(mine["q"], mine["k"], mine["v"], normalize=normalize,
                                          placement=placement, backend=backend, cu_seqlens=cu)
    _compare(groups, layout, batch, ["q", "k", "v"], reference, distributed)


# ------------------------------------------------------------------------------------------ local attention
def _local(groups, layout: str, window, sink, backend: str = "naive", length: int | None = None):
    from lctrain.kernels import local_attention as op
    length = length or _length(groups)
    rows, dim = 2, 3
    batch = _qkv_batch(rows, length, KV_HEADS, dim)
    positions = batch["position_ids"]

    def reference(full):
        o = op(*[_flat(full[n]) for n in "qkv"], window, sink, cu_seqlens=cu_seqlens_from_positions(positions),
               backend=backend)
        return o.reshape(rows, length, HEADS, VALUE)

    def distributed(mine, local, placement):
        return sp_local_attention(mine["q"], mine["k"], mine["v"], window, sink, placement=placement,
                                  backend=backend)
    _compare(groups, layout, batch, ["q", "k", "v"], reference, distributed)


CASES = {}
for _layout in ("contiguous", "zigzag"):
    CASES[f"taylor_{_layout}"] = lambda g, lay=_layout: _taylor(g, lay)
    # window within a chunk, with and without sinks; window spanning several chunks (and ranks)
    CASES[f"swa_{_layout}_w3_s0"] = lambda g, lay=_layout: _local(g, lay, 3, 0)
    CASES[f"swa_{_layout}_w4_s2"] = lambda g, lay=_layout: _local(g, lay, 4, 2)
    CASES[f"swa_{_layout}_w9_s3"] = lambda g, lay=_layout: _local(g, lay, 9, 3, length=4 * g.sp_size + 3)
CASES["taylor_unnormalized_local_cu_seqlens"] = lambda g: _taylor(g, "zigzag", normalize=False, use_cu=True)
CASES["taylor_chunked_kernel"] = lambda g: _taylor(g, "zigzag", backend="torch")
CASES["swa_chunked_kernel"] = lambda g: _local(g, "zigzag", 5, 2, backend="torch")
CASES["swa_window_1"] = lambda g: _local(g, "contiguous", 1, 0)
CASES["swa_per_head_spans"] = lambda g: _local(g, "zigzag", torch.tensor([2, 6]), torch.tensor([0, 3]))


# ------------------------------------------------------------------------------------------- whole model
def _model_case(pattern: str, mixers: str, layout: str, sp: str = "W", plan: dict | None = None):
    """Loss and every parameter gradient of a tiny float64 hybrid under SP (or DP 2 x SP 2) equal one device.
    `plan`: a MoA plan applied to the attention layers."""
    import tempfile

    from lctrain.config import load_config
    from lctrain.models import BatchContext, LanguageModel
    from lctrain.parallel import init_sp_groups, loss_normalizer

    vocab, tol = 61, 1e-7     # recurrent states are fp32 by contract
    extra = []
    if plan is not None:
        from lctrain.moa.plan import save_plan
        extra = [f"model.attn_plan={save_plan(plan, Path(tempfile.mkdtemp()) / 'plan.json')}"]

    def build():
        cfg = load_config(None, [f"model.vocab_size={vocab}", "model.d_model=16", "model.n_heads=2",
                                 "model.n_kv_heads=1", f"model.n_layers={len(pattern)}", f"model.pattern={pattern}",
                                 "model.ffn_dim=32", "model.loss_chunk_tokens=16", f"model.mixers={mixers}",
                                 *extra])
        torch.manual_seed(0)
        return LanguageModel(cfg.model).double()

    def run(world_groups):
        size = world_groups.world_size if sp == "W" else int(sp)
        if world_groups.world_size % size or (sp != "W" and size == world_groups.world_size):
            return                      # DP x SP cases only where they differ from the whole-world case
        groups = world_groups if size == world_groups.world_size else init_sp_groups(size)
        rows, length = 2, 5 * size + 3
        gen = torch.Generator().manual_seed(7)
        batch = {"input_ids": torch.randint(0, vocab, (rows, length), generator=gen),
                 "labels": torch.randint(0, vocab, (rows, length), generator=gen),
                 "position_ids": packed_positions(rows, length, [[7, 1, 20], [3, 33]])}
        batch["labels"][torch.rand(rows, length, generator=gen) < 0.2] = -100
        reference = build()
        out = reference(batch["input_ids"], batch["position_ids"], labels=batch["labels"])
        (out.loss_sum / out.n_targets).backward()

        dp = world_groups.world_size // size
        per_replica = rows // dp
        mine = {k: v[groups.dp_rank * per_replica:(groups.dp_rank + 1) * per_replica] for k, v in batch.items()}
        model = build()
        local, placement = shard_batch(mine, groups.sp_rank, groups.sp_size, layout, groups=groups)
        result = model(local["input_ids"], labels=local["labels"],
                       ctx=BatchContext.from_positions(local["position_ids"], sp=placement))
        targets = loss_normalizer(local["labels"], groups)
        (result.loss_sum / targets).backward()
        loss = result.loss_sum.detach().clone()
        dist.all_reduce(loss)
        assert_close(loss / targets, (out.loss_sum / out.n_targets).detach(), "loss", tol)
        for (name, p), p_ref in zip(model.named_parameters(), reference.parameters()):
            grad = p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
            dist.all_reduce(grad)
            assert_close(grad, p_ref.grad, f"grad {name}", tol)
    return run


_SWA = "swa: {window: 4, sink: 2}, conv: {kernel_size: 3}"
CASES["model_BSMA_zigzag"] = _model_case("BSMA", "{based: {feature_dim: 4}, landmark: {block_size: 4}, " + _SWA + "}",
                                         "zigzag")
_PLAN = {"format": "lctrain-moa-plan", "version": 1, "sink": 2, "n_heads": 2,
         "layers": {"0": [[2.0, 0.0], [1.0, 0.25]], "2": [[3.0, 0.125], [0.0, 1.0]]}}
CASES["model_AGA_moa_plan_zigzag"] = _model_case("AGA", "{}", "zigzag", plan=_PLAN)
CASES["model_TSBC_contiguous_dp2"] = _model_case(
    "TSBC", "{titans: {variant: mal, chunk_size: 3, persistent_tokens: 2}, based: {feature_dim: 4}, " + _SWA + "}",
    "contiguous", sp="2")


# ------------------------------------------------------------------------------------------------ Titans
def _titans(groups, layout: str, depth: int, chunk: int, persistent: int, variant: str = "mal", window: int = 4,
            segment: int = 64, extra: int = 0, param_tol: float | None = None):
    """A Titans mixer under SP against the same mixer on the whole batch: output and the
    gradients of the input and of every parameter (`extra` tokens per rank lengthen the row)."""
    from types import SimpleNamespace

    from lctrain.models import BatchContext
    from lctrain.models.mixers.titans import Titans

    dim, rows, length = 8, 2, (5 + extra) * groups.sp_size + 3
    cfg = SimpleNamespace(d_model=dim, n_heads=2, head_dim=0, rope_theta=10000.0, norm_eps=1e-6, init_std=0.5)

    def build():
        torch.manual_seed(3)
        return Titans(cfg, 0, variant=variant, chunk_size=chunk, memory_depth=depth, persistent_tokens=persistent,
                      window=window, segment_len=segment).double()
    positions = _positions(rows, length)
    batch = {"position_ids": positions, "x": torch.randn(rows, length, dim, dtype=torch.float64),
             "grad": torch.randn(rows, length, dim, dtype=torch.float64)}
    reference = build()
    full = leaves(batch, ["x"])
    o_ref = reference(full["x"], BatchContext.from_positions(positions))
    (o_ref * batch["grad"]).sum().backward()

    model = build()
    local, placement = shard_batch(batch, groups.sp_rank, groups.sp_size, layout, groups=groups)
    mine = leaves(local, ["x"])
    o = model(mine["x"], BatchContext.from_positions(local["position_ids"], sp=placement))
    (o * local["grad"]).sum().backward()
    tol = 1e-10
    assert_close(gather_sequence(o.detach(), placement), o_ref.detach(), "output", tol)
    assert_close(gather_sequence(mine["x"].grad, placement), full["x"].grad, "dx", tol)
    for (name, p), p_ref in zip(model.named_parameters(), reference.parameters()):
        if p.numel() == 0:
            continue
        grad = p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
        dist.all_reduce(grad)
        # RMSNorm (and RoPE's tables) compute in fp32: parameter gradients sum fp32-rounded terms per token in
        # another order, so they agree to fp32 round-off (outputs and input gradients above to float64's)
        assert_close(grad, p_ref.grad, f"grad {name}", param_tol or (2e-6 if "norm" in name else 1e-7))


# memory chunks that do and do not line up with shard boundaries, longer than a shard, and the MLP memory
CASES["titans_mag_contiguous"] = lambda g: _titans(g, "contiguous", 1, 3, 2, variant="mag", window=5)
CASES["titans_mal_zigzag_chunk4"] = lambda g: _titans(g, "zigzag", 1, 4, 3)
CASES["titans_mal_zigzag_long_chunk"] = lambda g: _titans(g, "zigzag", 1, 9, 0)
CASES["titans_mal_mlp_memory"] = lambda g: _titans(g, "zigzag", 2, 3, 2)
# MAC: T (7 W + 3) divisible neither by the segment length nor by the shard count; segments straddle shard
# boundaries (memory chunks restart inside each segment), are longer than a shard (the halo spans several
# ranks), and documents cross ranks; everything, parameter gradients included, to float64 round-off
CASES["titans_mac_contiguous"] = lambda g: _titans(g, "contiguous", 1, 2, 2, variant="mac", segment=4, extra=2,
                                                   param_tol=1e-10)
CASES["titans_mac_zigzag_long_segment"] = lambda g: _titans(g, "zigzag", 1, 3, 3, variant="mac", segment=7,
                                                            extra=2, param_tol=1e-10)
CASES["titans_mac_zigzag_mlp_memory"] = lambda g: _titans(g, "zigzag", 2, 2, 1, variant="mac", segment=3,
                                                          extra=2, param_tol=1e-10)


# ---------------------------------------------------------------------------------------------- landmark
def _landmark(groups, layout: str, block_size: int, backend: str = "naive"):
    from lctrain.kernels import landmark_attention as op
    from lctrain.parallel import sp_landmark_attention
    length = _length(groups)
    rows, dim = 2, 3
    batch = _qkv_batch(rows, length, KV_HEADS, dim)
    positions = batch["position_ids"]
    group = HEADS // KV_HEADS

    def reference(full):
        k, v = (full[n].repeat_interleave(group, dim=2) for n in "kv")
        o = op(_flat(full["q"]), _flat(k), _flat(v), block_size, cu_seqlens=cu_seqlens_from_positions(positions),
               backend=backend)
        return o.reshape(rows, length, HEADS, VALUE)

    def distributed(mine, local, placement):
        return sp_landmark_attention(mine["q"], mine["k"], mine["v"], block_size, placement=placement)
    _compare(groups, layout, batch, ["q", "k", "v"], reference, distributed)


CASES["landmark_zigzag_block3"] = lambda g: _landmark(g, "zigzag", 3)
CASES["landmark_contiguous_block4_chunked_kernel"] = lambda g: _landmark(g, "contiguous", 4, backend="torch")
