"""Per-mixer activation coefficients vs the tensors autograd actually saves (counted with saved_tensors_hooks),
on shapes other than the ones the coefficients were read from (fp32 and bf16 autocast, the CPU torch path, packed
documents)."""
import pytest
import torch

from lctrain.config import load_config
from lctrain.models import LanguageModel
from lctrain.plan.activations import layer_elements
from lctrain.plan.shape import shape_of

ROWS, SEQ_LEN, DOC_LEN = 2, 640, 200
CASES = {
    "attn": ["model.pattern=A", "model.n_heads=6", "model.n_kv_heads=3"],
    "gdn": ["model.pattern=G", "model.mixers={gdn: {n_heads: 3, head_k_dim: 24, head_v_dim: 40}}"],
    "linear": ["model.pattern=L", "model.n_heads=6"],
    "conv": ["model.pattern=C", "model.mixers={conv: {kernel_size: 6, expand: 2}}"],
}


def saved_bytes_per_layer(model, ids, positions) -> int:
    """Bytes of distinct storages autograd saves inside the block (parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen, inside = set(), [False]
    block = model.layers[0]
    block.register_forward_pre_hook(lambda *_: inside.__setitem__(0, True))
    block.register_forward_hook(lambda *_: inside.__setitem__(0, False))
    total = [0]

    def pack(t):
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if inside[0] and key not in seen and key not in params:
            seen.add(key)
            total[0] += storage.nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(ids, positions, labels=ids)
    return total[0]


def measured_one_layer(overrides: list[str], bf16: bool) -> tuple[LanguageModel, int]:
    """A one-layer model (d 96, ffn 224) with `overrides` and the bytes its block saves for backward on ROWS rows of
    SEQ_LEN tokens packed with DOC_LEN-token documents, in fp32 or under bf16 autocast."""
    cfg = load_config(None, ["model.vocab_size=200", "model.d_model=96", "model.n_layers=1", "model.ffn_dim=224",
                             "model.loss_chunk_tokens=256"] + overrides)
    torch.manual_seed(0)
    model = LanguageModel(cfg.model).train()
    ids = torch.randint(0, 200, (ROWS, SEQ_LEN))
    positions = (torch.arange(SEQ_LEN) % DOC_LEN).expand(ROWS, SEQ_LEN)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):  # the residual stream stays fp32 under it
        return model, saved_bytes_per_layer(model, ids, positions)


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16_autocast"])
@pytest.mark.parametrize("kind", sorted(CASES))
def test_saved_activations_match_the_coefficients(kind, bf16):
    model, measured = measured_one_layer(CASES[kind], bf16)
    shape = shape_of(model)
    elem = 2 if bf16 else 4
    planned = ROWS * SEQ_LEN * elem * layer_elements(shape.layers[0], shape.d_model, shape.ffn_dim, elem, "torch",
                                                     seq_len=SEQ_LEN)
    assert abs(planned / measured - 1) < 0.15, (kind, planned, measured)
