"""The planner's FLOPs vs `torch.utils.flop_counter` on CPU.

Whole model: the counter sees the matmuls of the projections, the fused LM head / cross-entropy (its in-place
`addmm_` for the head-weight gradient is given the `addmm` formula, which the counter lacks for the in-place op) and
the chunked linear-attention paths. The kernel ops are `torch.library` custom ops, which a dispatch mode sees as one
call with no formula; `IntoKernelOps` runs the recurrent ops' registered implementations (forward, and the backward
that recomputes the forward and differentiates it) with the counter still active below, so their matmuls are
counted as they run. The fused attention op is checked on its own: its torch path (`blockwise_forward` /
`_backward`, plain torch matmuls) run directly under the counter.
"""
import dataclasses

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from lctrain.config import load_config
from lctrain.models import LanguageModel
from lctrain.models.flops import flops_per_token
from lctrain.plan.compute import flops_per_micro_step, model_flops_per_token
from lctrain.plan.shape import model_shape
from tests.plan.kernel_ops import IntoKernelOps

BASE = ["model.vocab_size=512", "model.d_model=128", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_dim=320",
        "model.loss_chunk_tokens=256", "model.n_layers=4"]
CASES = {"attention": (BASE + ["model.pattern=A"], False),
         "hybrid_3to1": (BASE + ["model.pattern=GGGA"], False),
         "hybrid_3to1_checkpointed": (BASE + ["model.pattern=GGGA"], True),
         "linear": (BASE + ["model.pattern=LLLA"], False)}
ROWS, SEQ_LEN = 2, 512


def _addmm_flops(self_shape, a_shape, b_shape, *args, **kwargs) -> int:
    """FLOPs of the product in `self.addmm_(a, b)` (the counter's `addmm` rule)."""
    return 2 * a_shape[0] * a_shape[1] * b_shape[1]


@pytest.mark.parametrize("name", sorted(CASES))
def test_planned_flops_within_5_percent_of_flop_counter(name):
    overrides, checkpointing = CASES[name]
    cfg = load_config(None, overrides + [f"data.seq_len={SEQ_LEN}",
                                         f"model.activation_checkpointing={str(checkpointing).lower()}"])
    torch.manual_seed(0)
    model = LanguageModel(cfg.model).train()
    ids = torch.randint(0, cfg.model.vocab_size, (ROWS, SEQ_LEN))
    positions = torch.arange(SEQ_LEN).expand(ROWS, SEQ_LEN)
    with FlopCounterMode(display=False, custom_mapping={torch.ops.aten.addmm_: _addmm_flops}) as counter, \
            IntoKernelOps():
        model(ids, positions, labels=ids).loss_sum.backward()
    counted = counter.get_total_flops()
    planned = flops_per_micro_step(model_shape(cfg), ROWS, SEQ_LEN, 1, "contiguous", checkpointing)
    assert abs((planned["matmul"] + planned["recurrent"]) / counted - 1) < 0.05, (planned, counted)
    # the matmul family alone is exact up to the small weights that are not matmuls (norm gains, conv taps)
    ops = counter.get_flop_counts()["Global"]
    matmul_counted = ops.get(torch.ops.aten.mm, 0) + ops.get(torch.ops.aten.addmm_, 0)
    assert abs(planned["matmul"] / matmul_counted - 1) < 0.01, (planned["matmul"], matmul_counted)


@pytest.mark.parametrize("checkpointing", (False, True))
def test_attention_family_is_the_fused_ops_work(checkpointing):
    """14 H hd per visible query-key pair (forward 2 matmuls, backward 5 with S recomputed), + 4 with
    checkpointing, vs the op's torch path under the counter (tiles of 32 queries: the diagonal tiles' masked
    half is computed too, 3% here)."""
    from lctrain.kernels.attention.blockwise import blockwise_backward, blockwise_forward
    from lctrain.kernels.attention.pattern import Pattern
    from lctrain.plan.shape import LayerShape
    heads, kv_heads, dim, length = 4, 2, 16, 1024
    q = torch.randn(1, length, heads, dim)
    k, v = torch.randn(1, length, kv_heads, dim), torch.randn(1, length, kv_heads, dim)
    pattern = Pattern(True, (), (), dim ** -0.5)
    with FlopCounterMode(display=False) as counter:
        o, lse = blockwise_forward(q, k, v, pattern, None, q_block=32, k_block=256)
        if checkpointing:
            blockwise_forward(q, k, v, pattern, None, q_block=32, k_block=256)
        blockwise_backward(q, k, v, o, lse, torch.randn_like(o), None, pattern, None, q_block=32, k_block=256)
    layer = LayerShape("attn", 0, heads=heads, kv_heads=kv_heads, head_dim=dim)
    shape = model_shape(load_config(None, BASE + ["model.pattern=A", "model.n_layers=1"]))
    shape = dataclasses.replace(shape, layers=(layer,), layer_groups=((layer, 1),))
    planned = flops_per_micro_step(shape, 1, length, 1, "contiguous", checkpointing)["attention"]
    assert 1.0 <= counter.get_total_flops() / planned < 1.05, (counter.get_total_flops(), planned)


@pytest.mark.parametrize("seq_len", (512, 131072))
def test_mfu_numerator_is_the_training_loops(seq_len):
    """The plan's MFU uses the same FLOPs per token as the training loop's `mfu` metric, at any length."""
    cfg = load_config(None, BASE + ["model.pattern=GGGA"])
    model = LanguageModel(cfg.model)
    assert model_flops_per_token(model_shape(cfg), seq_len) == pytest.approx(flops_per_token(model, seq_len))
