"""The planner's FLOPs vs `torch.utils.flop_counter` over one forward + backward on CPU.

The counter sees matmuls: projections, the LM head (recomputed per loss chunk), the chunked linear-attention
paths' batched matmuls and, under SDPA's math backend, attention as two batched matmuls over every query-key pair;
so the planner is asked for `causal=False` (a masked SDPA computes the full square on that path).
"""
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from lctrain.config import load_config
from lctrain.models import LanguageModel
from lctrain.models.flops import flops_per_token
from lctrain.plan.compute import flops_per_micro_step, model_flops_per_token
from lctrain.plan.shape import model_shape

BASE = ["model.vocab_size=512", "model.d_model=128", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_dim=320",
        "model.loss_chunk_tokens=256", "model.n_layers=4"]
CASES = {"attention": (BASE + ["model.pattern=A"], False),
         "hybrid_3to1": (BASE + ["model.pattern=GGGA"], False),
         "hybrid_3to1_checkpointed": (BASE + ["model.pattern=GGGA"], True),
         "linear": (BASE + ["model.pattern=LLLA"], False)}
ROWS, SEQ_LEN = 2, 512


@pytest.mark.parametrize("name", sorted(CASES))
def test_planned_flops_within_5_percent_of_flop_counter(name):
    overrides, checkpointing = CASES[name]
    cfg = load_config(None, overrides + [f"data.seq_len={SEQ_LEN}",
                                         f"model.activation_checkpointing={str(checkpointing).lower()}"])
    torch.manual_seed(0)
    model = LanguageModel(cfg.model).train()
    ids = torch.randint(0, cfg.model.vocab_size, (ROWS, SEQ_LEN))
    positions = torch.arange(SEQ_LEN).expand(ROWS, SEQ_LEN)
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        model(ids, positions, labels=ids).loss_sum.backward()
    counted = counter.get_total_flops()
    planned = flops_per_micro_step(model_shape(cfg), ROWS, SEQ_LEN, 1, "contiguous", checkpointing, causal=False)
    assert abs(sum(planned.values()) / counted - 1) < 0.05, (planned, counted)
    # the matmul family alone is exact up to the small weights that are not matmuls (norm gains, conv taps)
    matmul_counted = counter.get_flop_counts()["Global"].get(torch.ops.aten.mm, 0)
    assert abs(planned["matmul"] / matmul_counted - 1) < 0.01, (planned["matmul"], matmul_counted)


@pytest.mark.parametrize("seq_len", (512, 131072))
def test_mfu_numerator_is_the_training_loops(seq_len):
    """The plan's MFU uses the same FLOPs per token as the training loop's `mfu` metric, at any length."""
    cfg = load_config(None, BASE + ["model.pattern=GGGA"])
    model = LanguageModel(cfg.model)
    assert model_flops_per_token(model_shape(cfg), seq_len) == pytest.approx(flops_per_token(model, seq_len))
