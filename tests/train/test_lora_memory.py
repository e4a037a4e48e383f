"""`--dry-run`'s memory under LoRA: gradients, gradient buckets and AdamW state exist for the parameters that train
(adapters, `lora.trainable`) only; the frozen base costs its weights alone (sharded under fsdp)."""
import contextlib

import pytest
import torch

from lctrain.config import LoraConfig, load_config
from lctrain.models import LanguageModel
from lctrain.plan.memory import memory_breakdown
from lctrain.plan.search import current_candidate
from lctrain.plan.shape import shape_of
from lctrain.train.lora import apply_lora
from lctrain.train.memory import fsdp_memory_per_gpu, peak_memory_line, run_workload
from tests.plan.kernel_ops import ALL_OPS, IntoKernelOps
from tests.plan.measure import packed_batch, second_step_peak_bytes
from tests.train.test_dry_run_peak import BASE, PEAK, SMALL

# every linear layer of the GDN / linear / attention hybrid below ("all-linear" LoRA)
LORA = LoraConfig(enabled=True, r=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "a_proj", "b_proj",
                                                     "g_proj", "u_proj", "gate", "up", "down"])
ROWS, SEQ = 1, 512
OVERRIDES = BASE + SMALL + ["model.n_layers=4", "model.pattern=GGLA", "train.dtype=float32",
                            f"data.seq_len={SEQ}", f"train.micro_batch_size={ROWS}"]


def lora_model(cfg):
    torch.manual_seed(0)
    return apply_lora(LanguageModel(cfg.model), LORA)


def all_trained(model):
    """The same module with every parameter trainable: what the estimate counted before."""
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def frozen_count(model) -> int:
    return sum(p.numel() for p in model.parameters() if not p.requires_grad)


@pytest.mark.parametrize("engine", ["ddp", "fsdp", "zero2"])
def test_lora_estimate_drops_gradients_and_adamw_of_the_frozen_base(engine):
    cfg = load_config(None, OVERRIDES + [f"train.engine={engine}" if engine != "zero2" else "train.engine=deepspeed",
                                         *(["deepspeed.zero_stage=2"] if engine == "zero2" else [])])
    lora = lora_model(cfg)
    frozen = frozen_count(lora)
    assert frozen > 0.5 * lora.num_parameters()
    full = all_trained(lora_model(cfg))
    world = 4
    cand, work = current_candidate(cfg, world), run_workload(cfg, "cpu")
    a, b = memory_breakdown(shape_of(lora), cand, work), memory_breakdown(shape_of(full), cand, work)
    assert a["params"] == b["params"]  # the frozen weights are still held (sharded under fsdp)
    sharded = 1 if engine == "ddp" else world
    assert b["grads"] - a["grads"] == pytest.approx(4 * frozen / sharded, abs=4)
    assert b["optimizer"] - a["optimizer"] == pytest.approx(8 * frozen / world if engine != "ddp" else 8 * frozen,
                                                            abs=8)
    if engine == "fsdp":  # the per-GPU estimate for mixer types the planner does not model, on CUDA's terms
        x, y = fsdp_memory_per_gpu(cfg, lora, world), fsdp_memory_per_gpu(cfg, full, world)
        assert x["weights"] == y["weights"]
        assert y["gradients"] + y["adamw"] - x["gradients"] - x["adamw"] == pytest.approx(12 * frozen / world)


@contextlib.contextmanager
def frozen_params_without_grad_hooks():
    """MemTracker hooks every parameter's gradient, which a frozen one cannot take (it never has a gradient):
    skip those hooks."""
    register, post = torch.Tensor.register_hook, torch.Tensor.register_post_accumulate_grad_hook

    class NoHandle:
        def remove(self):
            pass

    def guard(original):
        def hook(tensor, fn):
            return original(tensor, fn) if tensor.requires_grad else NoHandle()
        return hook
    torch.Tensor.register_hook, torch.Tensor.register_post_accumulate_grad_hook = guard(register), guard(post)
    try:
        yield
    finally:
        torch.Tensor.register_hook, torch.Tensor.register_post_accumulate_grad_hook = register, post


def measured_lora_peak_mib(cfg) -> float:
    """MemTracker's peak over the second LoRA training step (AdamW state exists then), fp32 on CPU."""
    batch = packed_batch(ROWS, SEQ, cfg.model.vocab_size, SEQ)
    return second_step_peak_bytes(lora_model(cfg).train(), cfg, batch, ALL_OPS,
                                  context=frozen_params_without_grad_hooks) / 2**20


def test_printed_lora_peak_within_25_percent_of_measured():
    """The estimate errs high under LoRA: besides the states it counts, autograd keeps fewer activations (an op
    with a frozen weight need not save its input for that weight's gradient), which the saved-tensor counts do not
    model. Measured on this model (fp32, 1 x 512 tokens): estimate / measured 1.21 with all linear layers adapted,
    1.26 with q, v and the MLP (1.41 when gradients and AdamW state were counted for every weight), 1.35 with
    attention projections only; 1.10 without LoRA."""
    cfg = load_config(None, OVERRIDES)
    line = peak_memory_line(cfg, lora_model(cfg), 1, "cpu")
    estimate = float(PEAK.search(line).group(2))
    before = float(PEAK.search(peak_memory_line(cfg, all_trained(lora_model(cfg)), 1, "cpu")).group(2))
    measured = measured_lora_peak_mib(cfg)
    assert estimate < before
    assert 0.75 <= estimate / measured <= 1.25, (estimate, measured, before)
