"""Hand-written backwards of the per-token blocks (RMSNorm, SwiGLU's silu(a) * b, RoPE rotation, the short
convolution of whole rows)
against the plain autograd formulas they replace, in float64 on awkward shapes: outputs and every gradient."""
import pytest
import torch
import torch.nn.functional as F

from lctrain.config import ModelConfig
from lctrain.models.blocks import RMSNorm, RotaryEmbedding, SwiGLU, _RMSNormFn, _SiLUMulFn
from lctrain.models.context import BatchContext
from lctrain.models.mixers.qkv import batch_cos_sin
from lctrain.models.shortconv import ShortConvolution, causal_depthwise_conv


def _grads(out, inputs, grad):
    return torch.autograd.grad(out, inputs, grad)


def _reference_norm(x, weight, eps):
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.to(xf.dtype)).to(x.dtype)


@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 5, 7), (2, 3, 4, 6)])
def test_rmsnorm_matches_autograd_formula(shape):
    torch.manual_seed(0)
    norm = RMSNorm(shape[-1]).double()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    g = torch.randn(*shape, dtype=torch.float64)
    out, want = norm(x), _reference_norm(x, norm.weight, norm.eps)
    assert torch.equal(out, want)
    for a, b in zip(_grads(out, (x, norm.weight), g), _grads(want, (x, norm.weight), g)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)
    w = norm.weight.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: _RMSNormFn.apply(a, b, 1e-6), (x.detach().requires_grad_(), w))


def test_rmsnorm_bf16_input_keeps_dtype_and_fp32_arithmetic():
    x = torch.randn(2, 3, 8, dtype=torch.bfloat16, requires_grad=True)
    norm = RMSNorm(8)
    out = norm(x)
    assert out.dtype == torch.bfloat16 and torch.equal(out, _reference_norm(x, norm.weight, norm.eps))
    out.float().sum().backward()
    assert x.grad.dtype == torch.bfloat16 and norm.weight.grad.dtype == torch.float32


def _reference_rotate(x, cos, sin):
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    half = xf.shape[-1] // 2
    return (xf * cos + torch.cat([-xf[..., half:], xf[..., :half]], dim=-1) * sin).to(x.dtype)


def test_rotation_and_its_backward_match_the_rotate_half_formula():
    torch.manual_seed(1)
    rope = RotaryEmbedding(6)
    cos, sin = (t.double() for t in rope.cos_sin(torch.tensor([[0, 1, 2, 0, 1], [3, 4, 5, 6, 7]])))
    x = torch.randn(2, 5, 3, 6, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 5, 3, 6, dtype=torch.float64)
    out, want = RotaryEmbedding.rotate(x, cos, sin), _reference_rotate(x, cos, sin)
    torch.testing.assert_close(out, want, rtol=1e-15, atol=1e-15)
    torch.testing.assert_close(_grads(out, x, g)[0], _grads(want, x, g)[0], rtol=1e-15, atol=1e-15)


def test_rope_tables_are_built_once_per_batch():
    ctx = BatchContext.from_positions(torch.arange(6).expand(2, 6))
    rope, calls = RotaryEmbedding(4), []
    real = rope.cos_sin
    rope.cos_sin = lambda p: calls.append(p) or real(p)
    first, second = batch_cos_sin(rope, ctx), batch_cos_sin(rope, ctx)
    assert len(calls) == 1 and first[0] is second[0]
    other = BatchContext.from_positions(torch.arange(6).expand(2, 6))
    batch_cos_sin(rope, other)
    assert len(calls) == 2


@pytest.mark.parametrize("length", [1, 2, 3, 4, 9])
@pytest.mark.parametrize("activation", [True, False])
def test_whole_row_short_conv_matches_shifted_copies(length, activation):
    torch.manual_seed(length)
    conv = ShortConvolution(5, 4, activation=activation).double()
    x = torch.randn(3, length, 5, dtype=torch.float64, requires_grad=True)
    g = torch.randn(3, length, 5, dtype=torch.float64)
    out = conv(x, None)
    want = causal_depthwise_conv(x, conv.weight, None)
    want = F.silu(want) if activation else want
    torch.testing.assert_close(out, want, rtol=1e-14, atol=1e-14)
    for a, b in zip(_grads(out, (x, conv.weight), g), _grads(want, (x, conv.weight), g)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)


def test_model_gradients_unchanged_in_float64():
    """A whole GA model: the fused blocks give the gradients of the plain formulas (patched back in)."""
    import lctrain.models.blocks as blocks
    import lctrain.models.shortconv as shortconv
    from lctrain.models import LanguageModel

    cfg = ModelConfig(vocab_size=32, d_model=16, n_layers=2, n_heads=2, pattern="GA", ffn_dim=24)
    torch.manual_seed(3)
    model = LanguageModel(cfg).double()
    ids = torch.randint(0, 32, (2, 7))

    def grads():
        model.zero_grad(set_to_none=True)
        out = model(ids, labels=ids)
        out.loss_sum.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    fused = grads()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(blocks._RMSNormFn, "apply", staticmethod(_reference_norm))
        mp.setattr(blocks._Rotate, "apply", staticmethod(_reference_rotate))
        mp.setattr(shortconv._ConvSiLU, "apply",
                   staticmethod(lambda x, w, act: (F.silu if act else (lambda y: y))(causal_depthwise_conv(x, w, None))))
        plain = grads()
    assert fused.keys() == plain.keys() and len(fused) > 10
    for name in fused:
        torch.testing.assert_close(fused[name], plain[name], rtol=1e-10, atol=1e-12, msg=name)


def test_whole_row_short_conv_keeps_the_promoted_dtype():
    """A bf16 input with fp32 taps computes and returns fp32, as `x * weight` did; gradients come back in bf16."""
    conv = ShortConvolution(6, 4)
    x = torch.randn(2, 5, 6).to(torch.bfloat16).requires_grad_()
    out = conv(x, None)
    want = F.silu(causal_depthwise_conv(x, conv.weight, None))
    assert out.dtype == want.dtype == torch.float32
    torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-6)
    out.sum().backward()
    assert x.grad.dtype == torch.bfloat16 and conv.weight.grad.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1), (3, 5, 7)])
def test_silu_mul_equals_autograd_and_keeps_two_tensors(dtype, shape):
    """silu(a) * b: the same bits as autograd through F.silu and a product (the backward recomputes silu(a) with
    autograd's arithmetic), one saved tensor fewer; float64 gradcheck."""
    torch.manual_seed(1)
    a = torch.randn(*shape, dtype=dtype, requires_grad=True)
    b = torch.randn(*shape, dtype=dtype, requires_grad=True)
    g = torch.randn(*shape, dtype=dtype)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = _SiLUMulFn.apply(a, b)
    want = F.silu(a) * b
    assert len(saved) == 2 and torch.equal(out, want)
    for got, ref in zip(_grads(out, (a, b), g), _grads(want, (a, b), g)):
        assert torch.equal(got, ref)
    if dtype == torch.float64:
        assert torch.autograd.gradcheck(_SiLUMulFn.apply, (a, b))
    # only one input needing a gradient (a frozen gate or up projection)
    (d_b,) = torch.autograd.grad(_SiLUMulFn.apply(a.detach(), b), (b,), g)
    assert torch.equal(d_b, _grads(F.silu(a.detach()) * b, (b,), g)[0])


def test_swiglu_module_uses_the_fused_product():
    torch.manual_seed(2)
    mlp = SwiGLU(6, 10).double()
    x = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    want = mlp.down(F.silu(mlp.gate(x)) * mlp.up(x))
    out = mlp(x)
    names, stack = set(), [out.grad_fn]
    while stack:
        node = stack.pop()
        if node is not None and node.name() not in names:
            names.add(node.name())
            stack.extend(fn for fn, _ in node.next_functions)
    assert torch.equal(out, want) and "_SiLUMulFnBackward" in names and "SiluBackward0" not in names
