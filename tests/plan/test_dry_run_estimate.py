"""`--dry-run`'s activation estimate is the planner's activation model (they cannot drift apart)."""
import torch

from lctrain.config import load_config
from lctrain.models import LanguageModel
from lctrain.plan.activations import activation_bytes
from lctrain.plan.shape import shape_of
from lctrain.train.memory import activation_memory_estimate

OVERRIDES = ["model.vocab_size=300", "model.d_model=64", "model.n_heads=4", "model.n_kv_heads=2",
             "model.n_layers=4", "model.pattern=GGGA", "model.ffn_dim=160", "data.seq_len=512",
             "train.micro_batch_size=2", "model.loss_chunk_tokens=256"]


def test_dry_run_uses_the_plan_activation_model():
    for ckpt in ("false", "true"):
        cfg = load_config(None, OVERRIDES + [f"model.activation_checkpointing={ckpt}"])
        model = LanguageModel(cfg.model)
        elem = 2 if torch.cuda.is_available() else 4
        parts = activation_bytes(shape_of(model), 2, 512, 1, "contiguous", "allgather", elem, ckpt == "true",
                                 "triton" if torch.cuda.is_available() else "torch")
        logits = 256 * 300 * 4 * 2
        assert activation_memory_estimate(cfg, model) == sum(parts.values()) + logits


def test_dry_run_estimate_for_mixers_the_plan_does_not_model():
    cfg = load_config(None, OVERRIDES[:4] + ["model.n_layers=2", "model.pattern=SA", "model.ffn_dim=160",
                                             "data.seq_len=128", "train.micro_batch_size=2"])
    assert activation_memory_estimate(cfg, LanguageModel(cfg.model)) > 0
