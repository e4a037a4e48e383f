"""gated_delta_rule Triton launch table: the bf16/fp16 configuration (64-token chunks) is exact when run in the
interpreter on fp32 data, fp16 inputs match float64 end to end, bf16/fp16 inputs keep every per-chunk tensor (the
entering states above all) in their own type, and the planner counts those bytes."""
import dataclasses

import pytest
import torch

from lctrain.kernels.gated_delta_rule import triton_chunk
from lctrain.kernels.gated_delta_rule.triton_config import launch_config
from tests.kernels.test_gated_delta_rule import (assert_close_rel, check_triton_against_naive, cotangents_for,
                                                 doc_offsets, make_inputs, run_with_grads)


def test_launch_table_chunks():
    for key_dim, value_dim in ((128, 128), (128, 256), (64, 64), (16, 32)):
        assert launch_config(key_dim, value_dim, "bf16").chunk == 64
        assert launch_config(key_dim, value_dim, "fp16") == launch_config(key_dim, value_dim, "bf16")
        assert launch_config(key_dim, value_dim, "fp32").chunk == 32


@pytest.fixture
def bf16_table_for_fp32(monkeypatch):
    """fp32 launches use the bf16 launch configuration; the kernels' casts to the input type are then no-ops,
    so the interpreter checks exactly the arithmetic bf16 runs, at its chunk size, without bf16 rounding."""
    monkeypatch.setattr(triton_chunk, "launch_config", lambda key_dim, value_dim, dtype: launch_config(
        key_dim, value_dim, "bf16"))
    seen = []

    def nan_buffer(shape, dtype, device):  # poisoned, as in test_gated_delta_rule
        seen.append(tuple(shape))
        return torch.full(tuple(shape), float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(triton_chunk, "new_buffer", nan_buffer)
    return seen


# Documents straddling the 64-token chunk boundary (1, 63, 64, 65 tokens, a ragged tail); the interpreter is
# slow, so the default suite runs one small case.
@pytest.mark.parametrize("batch,seq_len,heads,key_dim,value_dim,lengths", [
    (1, 130, 1, 16, 16, [1, 64, 65]),
    pytest.param(1, 200, 2, 16, 32, [1, 63, 64, 65, 7], marks=pytest.mark.slow),
    pytest.param(2, 130, 1, 32, 16, None, marks=pytest.mark.slow),
])
def test_triton_at_the_bf16_configuration_matches_naive(bf16_table_for_fp32, batch, seq_len, heads, key_dim,
                                                         value_dim, lengths):
    check_triton_against_naive(batch, seq_len, heads, key_dim, value_dim, lengths)
    chunks = sum(-(-n // 64) for n in lengths) if lengths else batch * -(-seq_len // 64)
    assert (batch * seq_len, heads, 64) in bf16_table_for_fp32  # A and Aqk rows are 64 wide...
    assert (chunks, heads, key_dim, value_dim) in bf16_table_for_fp32  # ...and one state per 64-token chunk


def test_fp16_inputs_match_naive(monkeypatch):
    """The half-precision path end to end in the interpreter (fp16: its tl.dot is emulated correctly there, bf16's
    is not): fp16 operands, 2-byte per-chunk tensors, 64-token chunks, against float64 on the same rounded inputs.
    Measured about 5e-4 relative error (fp16 rounds at 2^-11; bf16, at 2^-8, is checked on a GPU)."""
    monkeypatch.setattr(triton_chunk, "new_buffer", lambda shape, dtype, device: torch.full(
        tuple(shape), float("nan"), dtype=dtype, device=device))
    lengths = [1, 64, 65, 70]
    cu_seqlens = doc_offsets(lengths)
    inputs = make_inputs(1, sum(lengths), 2, 32, 32, num_seqs=len(lengths))
    rounded = [x.to(torch.float16) for x in inputs[:3]] + [x.float() for x in inputs[3:]]
    cotangents = cotangents_for(inputs, cu_seqlens)
    want = run_with_grads([x.double() for x in rounded], cotangents, cu_seqlens, "naive")
    got = run_with_grads(rounded, cotangents, cu_seqlens, "triton")
    assert_close_rel(got, want, 3e-3)


class _NoLaunch:
    """Stands in for a Triton kernel: `kernel[grid](...)` does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


@pytest.fixture
def recorded_buffers(monkeypatch):
    """Kernels replaced by no-ops, buffers recorded: what the launcher allocates for a dtype, on CPU."""
    for name in dir(triton_chunk):
        if name.startswith("gdn_") and name.endswith("_kernel"):
            monkeypatch.setattr(triton_chunk, name, _NoLaunch())
    made = []

    def record(shape, dtype, device):
        made.append((tuple(shape), dtype))
        return torch.zeros(tuple(shape), dtype=dtype, device=device)

    monkeypatch.setattr(triton_chunk, "new_buffer", record)
    return made


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_per_chunk_tensors_are_stored_in_the_input_dtype(recorded_buffers, dtype):
    T, H, K, V = 300, 2, 128, 256
    q, k, v = torch.zeros(T, H, K, dtype=dtype), torch.zeros(T, H, K, dtype=dtype), torch.zeros(T, H, V, dtype=dtype)
    g, beta = torch.zeros(T, H), torch.zeros(T, H)
    cu = torch.tensor([0, 100, 300], dtype=torch.int32)
    cfg = launch_config(K, V, triton_chunk.TORCH_DTYPES[dtype])
    _, _, saved = triton_chunk._forward(q, k, v, g, beta, 1.0, None, True, cu, cfg)
    cum_gate, a_inv, a_qk, w, delta, chunk_states, _, _ = saved
    chunks = -(-100 // cfg.chunk) + -(-200 // cfg.chunk)
    assert chunk_states.shape == (chunks, H, K, V) and chunk_states.dtype == dtype
    assert cum_gate.dtype == torch.float32
    for tensor in (a_inv, a_qk, w, delta):
        assert tensor.dtype == dtype
    saved_bytes = sum(t.numel() * t.element_size() for t in saved[:6])
    elem = torch.tensor([], dtype=dtype).element_size()
    assert saved_bytes == T * H * 4 + elem * H * (T * (2 * cfg.chunk + K + V) + chunks * K * V)
    # Backward: the state gradients and d_delta (product operands) in the input type, the shares fp32.
    recorded_buffers.clear()
    triton_chunk._backward(q, k, v, beta, 1.0, saved, torch.zeros(T, H, V, dtype=dtype), None, False, cu, cfg)
    shapes = dict(recorded_buffers[:2])
    assert shapes == {(chunks, H, K, V): dtype, (T, H, V): dtype}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_planner_counts_the_saved_set(recorded_buffers, dtype):
    """The planner's GDN triton term (`op_backward_elements`) equals the bytes `_forward` saves beside its inputs
    (plus the fp32 beta copy the Function keeps), for one document a whole number of chunks long."""
    from types import SimpleNamespace

    from lctrain.plan.activations import op_backward_elements

    T, H, K, V = 256, 4, 128, 256
    q, k = torch.zeros(T, H, K, dtype=dtype), torch.zeros(T, H, K, dtype=dtype)
    v = torch.zeros(T, H, V, dtype=dtype)
    cfg = launch_config(K, V, triton_chunk.TORCH_DTYPES[dtype])
    cu = torch.tensor([0, T], dtype=torch.int32)
    _, _, saved = triton_chunk._forward(q, k, v, torch.zeros(T, H), torch.zeros(T, H), 1.0, None, False, cu, cfg)
    saved_bytes = sum(t.numel() * t.element_size() for t in saved[:6]) + T * H * 4  # + fp32 beta
    layer = SimpleNamespace(type="gdn", heads=H, key_dim=K, value_dim=V)
    elem = torch.tensor([], dtype=dtype).element_size()
    assert T * 4 * op_backward_elements(layer, "triton", elem) == pytest.approx(saved_bytes, rel=1e-9)
