"""Every mixer's block traces as ONE graph under `torch.compile(fullgraph=True)` on a packed batch (no graph
break, so no host sync from a `.item()`/`.tolist()` on a device tensor), and the compiled block (AOTAutograd,
through each kernel op's fake implementation and registered backward) equals eager, forward and gradients."""
import pytest
import torch

from lctrain.config import load_config
from lctrain.models import BatchContext, LanguageModel

LETTERS = ["G", "L", "S", "B", "C", "M", "T",
           pytest.param("A", marks=pytest.mark.xfail(reason="attention mixer: single entry point and host-side "
                                                      "document checks belong to the fused-attention issue (#14)",
                                                 strict=False))]
MIXER_OPTS = ("model.mixers={gdn: {head_k_dim: 8, head_v_dim: 16}, swa: {window: 5}, landmark: {block_size: 4}, "
              "titans: {variant: mag, chunk_size: 4, window: 6, persistent_tokens: 2}, based: {feature_dim: 4}, "
              "conv: {kernel_size: 3}}")


def tiny_block(letter: str):
    overrides = ["model.vocab_size=31", "model.d_model=32", "model.n_heads=4", "model.n_kv_heads=2",
                 "model.n_layers=1", f"model.pattern={letter}", "model.ffn_dim=48", MIXER_OPTS]
    torch.manual_seed(0)
    return LanguageModel(load_config(None, overrides).model).layers[0]


def packed_ctx():
    # two rows of 13 tokens; row 0 holds three documents, row 1 two
    pos = torch.tensor([list(range(5)) + list(range(3)) + list(range(5)), list(range(9)) + list(range(4))])
    return BatchContext.from_positions(pos)


@pytest.mark.parametrize("letter", LETTERS)
def test_block_compiles_fullgraph_and_matches_eager(letter):
    torch._dynamo.reset()
    block = tiny_block(letter)
    ctx = packed_ctx()
    x = torch.randn(2, 13, 32, requires_grad=True)
    want = block(x, ctx)
    want_grads = torch.autograd.grad(want.square().sum(), [x, *block.parameters()])
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    got = compiled(x, ctx)
    got_grads = torch.autograd.grad(got.square().sum(), [x, *block.parameters()])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
