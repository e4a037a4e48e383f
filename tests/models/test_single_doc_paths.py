"""Rows that are one document take the batched [B, T] path (no packing, no conv masking); it must equal the packed
path exactly, outputs and every parameter gradient. Short convolutions given the per-batch document ids equal the
ones that derive them from positions."""
import torch

from lctrain.config import load_config
from lctrain.models import BatchContext, LanguageModel
from lctrain.models.documents import Documents
from lctrain.models.shortconv import causal_depthwise_conv

VOCAB = 61


def _model(pattern: str) -> LanguageModel:
    overrides = [f"model.vocab_size={VOCAB}", "model.d_model=32", "model.n_heads=4", "model.n_layers=4",
                 f"model.pattern={pattern}", "model.ffn_dim=48", "model.mixers={gdn: {head_k_dim: 8, head_v_dim: 16}}"]
    torch.manual_seed(0)
    return LanguageModel(load_config(None, overrides).model).double()


def _loss_and_grads(model, ids, labels, ctx):
    model.zero_grad(set_to_none=True)
    out = model(ids, labels=labels, ctx=ctx)
    out.loss_sum.backward()
    return out.loss_sum.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_batched_path_equals_packed_path_for_single_document_rows():
    model = _model("GLBC")  # gated deltanet, linear attention, BASED, gated conv: every run_linear_op/short_conv user
    batch, seqlen = 3, 70  # not a multiple of the chunk size
    ids = torch.randint(0, VOCAB, (batch, seqlen), generator=torch.Generator().manual_seed(1))
    labels = ids.roll(-1, 1)
    labels[:, -1] = -100
    positions = torch.arange(seqlen).expand(batch, seqlen)
    batched = BatchContext.from_positions(positions)
    assert batched.docs.single_doc_rows
    # the same boundaries without host metadata: the mixers fall back to the packed (varlen) path
    packed = BatchContext(position_ids=positions, cu_seqlens=batched.cu_seqlens)
    loss_b, grads_b = _loss_and_grads(model, ids, labels, batched)
    loss_p, grads_p = _loss_and_grads(model, ids, labels, packed)
    torch.testing.assert_close(loss_b, loss_p, rtol=1e-12, atol=1e-12)
    assert grads_b.keys() == grads_p.keys() and len(grads_b) == len(list(model.parameters()))
    for name in grads_b:
        torch.testing.assert_close(grads_b[name], grads_p[name], rtol=1e-9, atol=1e-12, msg=name)


def test_multi_document_rows_still_isolate_documents():
    model = _model("GLBC")
    ids = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(2))
    positions = torch.cat([torch.arange(15), torch.arange(25)]).expand(2, 40)
    ctx = BatchContext.from_positions(positions)
    assert not ctx.docs.single_doc_rows
    with torch.no_grad():
        hidden = model(ids, ctx=ctx).hidden
        second = model(ids[:, 15:]).hidden  # the second document alone
    torch.testing.assert_close(hidden[:, 15:], second, rtol=1e-10, atol=1e-12)


def test_short_conv_with_document_ids_equals_positions_and_unmasked_single_documents():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 12, 5, dtype=torch.float64, generator=gen)
    w = torch.randn(5, 4, dtype=torch.float64, generator=gen)
    positions = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 0, 1, 2, 3, 4], [5, 6, 0, 1, 2, 3, 4, 5, 6, 7, 0, 1]])
    ids = Documents.from_positions(positions).document_ids("cpu")
    torch.testing.assert_close(causal_depthwise_conv(x, w, positions, document_ids=ids),
                               causal_depthwise_conv(x, w, positions), rtol=0, atol=0)
    single = torch.arange(12).expand(2, 12)
    torch.testing.assert_close(causal_depthwise_conv(x, w, None), causal_depthwise_conv(x, w, single),
                               rtol=0, atol=0)
