"""Every mixer's block traces as ONE graph under `torch.compile(fullgraph=True)` on a packed batch (no graph
break, so no host sync from a `.item()`/`.tolist()` on a device tensor), and the compiled block (AOTAutograd,
through each kernel op's fake implementation and registered backward) equals eager, forward and gradients."""
import pytest
import torch

from lctrain.config import load_config
from lctrain.models import BatchContext, LanguageModel

LETTERS = ["A", "G", "L", "S", "B", "C", "M", pytest.param("T", marks=pytest.mark.slow)]
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


def _train(model, steps=4):
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        ids = torch.randint(0, 31, (2, 13), generator=gen)
        ctx = packed_ctx()
        out = model(ids, labels=ids, ctx=ctx)
        loss = out.loss_sum / out.n_targets
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def test_compiled_model_trains_like_eager_with_activation_checkpointing():
    """`model.compile` (every block compiled in place) with activation checkpointing: 4 AdamW steps give the eager
    losses within 1e-3 relative, and parameter names are unchanged."""
    from lctrain.models.compile import compile_blocks

    torch._dynamo.reset()
    overrides = ["model.vocab_size=31", "model.d_model=32", "model.n_heads=4", "model.n_kv_heads=2",
                 "model.n_layers=4", "model.pattern=GLSC", "model.ffn_dim=48", "model.activation_checkpointing=true",
                 MIXER_OPTS]
    cfg = load_config(None, overrides).model
    torch.manual_seed(0)
    eager = LanguageModel(cfg)
    compiled = LanguageModel(cfg)
    compiled.load_state_dict(eager.state_dict())
    names = list(compiled.state_dict())
    report = compile_blocks(compiled, "aot_eager")
    assert list(compiled.state_dict()) == names
    want, got = _train(eager), _train(compiled)
    for a, b in zip(got, want):
        assert abs(a - b) <= 1e-3 * abs(b), (got, want)
    lines = []
    for last in (False, True):
        report.after_step(lines.append, last=last)
    assert len(lines) == 1 and "4 blocks compiled (aot_eager)" in lines[0]
