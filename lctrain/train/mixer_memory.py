"""Saved activations of the mixer types `lctrain plan` does not model (swa, based, landmark, titans), per token.

Counts are elements of the activation dtype per token of one layer's mixer (the block's norms and MLP come on
top), read off each module's forward and fitted to the tensors autograd saves on CPU (`saved_tensors_hooks`, fp32,
packed documents; `tests/train/test_dry_run_peak.py` checks them). Every kernel op here saves only its inputs
(the fused attention also its output and fp32 log-sum-exp) and recomputes the rest in backward, on every
backend, so no `[H, T, T]` tensor and no per-chunk state is kept between forward and backward.

  swa       rotated q, k, v and the output (which is the output projection's input): 2 H hd + 2 Hkv hd (the
            rotation's backward needs only the fp32 RoPE cos / sin, 2 hd), and the op's fp32 log-sum-exp (H)
  landmark  as swa, with k and v repeated to every query head before the op: 4 H hd + 2 hd fp32
  based     q and k feature projections (2 H F), v and the op's output (2 H hv)
  titans    memory projections, gates, the memory op's inputs and chunk outputs, and per variant the attention
            branch; fitted per variant as a x inner + b x d (inner = H hd): mal 7.34 / 2.5, mag 16.09 / 2.3,
            mac 26.12 / 6.3 (segment_len 64, 4 persistent tokens; the MLP memory is counted as the linear one;
            a refitted at inner = d after RoPE and the norms got closed-form backwards)

Under bf16 autocast the residual stream stays fp32 (`lctrain.plan.activations.block_elements`) and each
projection keeps its own bf16 copy of the normed input (`AUTOCAST`; fitted to the saved tensors under CPU
autocast within 7%).

`op_backward_elements` is what an op's backward holds beyond its inputs' gradients while it recomputes its
forward under autograd, in fp32 elements per token. The CPU chunk paths were measured with MemTracker inside the
op (one document per row, the largest case; fitted within 6%): based H (3.3 F' + 1.35 F' (V + 1) / 64 + 365)
with F' = 1 + F + F^2 feature rows, titans H (9.9 K + 2.1 K^2 / c + 7.4 c) with c = chunk_size; the attention
paths work in tiles (nothing measurable). On CUDA what the Triton functions save instead: titans' per-chunk memory
and momentum states (2 H K^2 / c), the attention output and log-sum-exp (H (hd + 1)).
"""
from __future__ import annotations

TAYLOR_CHUNK = 64  # the taylor op's chunk on the torch path
TITANS = {"mal": (7.34, 2.5), "mag": (16.09, 2.3), "mac": (26.12, 6.3)}
# d-sized tensors more under bf16 autocast: a bf16 copy of the normed input per projection reading it (3 for
# the softmax mixers and based), and titans' fp32 memory-side tensors beside them (fitted per variant)
AUTOCAST = {"swa": 3.75, "landmark": 3.75, "based": 3.75, "mal": 3.22, "mag": 4.87, "mac": 4.23}


def mixer_elements(mixer, d_model: int, elem: int) -> float:
    """Saved elements (of `elem` bytes) per token of one mixer of a type the planner does not model; other
    types (registered later, unknown here) get 8 d, the older rough count."""
    f32 = 4 / elem
    kind = getattr(mixer, "mixer_type", "")
    autocast = AUTOCAST.get(mixer.variant if kind == "titans" else kind, 0) * d_model if elem < 4 else 0
    if kind == "swa":
        return 2 * mixer.n_heads * mixer.head_dim + 2 * mixer.n_kv_heads * mixer.head_dim \
            + (2 * mixer.head_dim + mixer.n_heads) * f32 + autocast
    if kind == "landmark":
        return 4 * mixer.n_heads * mixer.head_dim + 2 * mixer.head_dim * f32 + autocast
    if kind == "based":
        return 2 * mixer.n_heads * mixer.feature_dim + 2 * mixer.n_heads * mixer.head_dim + autocast
    if kind == "titans":
        a, b = TITANS[mixer.variant]
        return a * mixer.n_heads * mixer.head_dim + b * d_model + autocast
    return 8.0 * d_model


def op_input_elements(mixer, d_model: int) -> float:
    """Elements per token of the mixer op's inputs (whose gradients its backward forms)."""
    kind = getattr(mixer, "mixer_type", "")
    if kind in ("swa", "landmark"):
        return (mixer.n_heads + 2 * mixer.n_kv_heads) * mixer.head_dim
    if kind == "based":
        return mixer.n_heads * (2 * mixer.feature_dim + mixer.head_dim)
    if kind == "titans":
        return 3 * mixer.n_heads * mixer.head_dim
    return float(d_model)


def op_backward_elements(mixer, backend: str) -> float:
    """fp32 elements per token an op's backward holds beyond its inputs' gradients while it recomputes its
    forward under autograd (see the module docstring)."""
    kind = getattr(mixer, "mixer_type", "")
    if kind == "based":  # torch: feature maps (F' = 1 + F + F^2 wide), [C, C] scores, one state per chunk
        wide = 1 + mixer.feature_dim + mixer.feature_dim ** 2
        if backend != "torch":  # the Triton function keeps its inputs; its output [V + 1] is what is new
            return mixer.n_heads * (mixer.head_dim + 1)
        return mixer.n_heads * (3.3 * wide + 1.35 * wide * (mixer.head_dim + 1) / TAYLOR_CHUNK + 5.7 * TAYLOR_CHUNK)
    if kind == "titans":  # the memory op: per-chunk memory and momentum states [K, V] (c = chunk_size)
        k, c = mixer.head_dim, mixer.chunk_size
        if backend != "torch":  # the Triton function saves both per-chunk states for its backward
            return mixer.n_heads * 2 * k * k / c
        return mixer.n_heads * (9.9 * k + 2.1 * k * k / c + 7.4 * c)
    if kind in ("swa", "landmark") and backend != "torch":  # the Triton function's output and log-sum-exp
        return mixer.n_heads * (mixer.head_dim + 1)
    return 0.0  # the CPU attention paths work in tiles
