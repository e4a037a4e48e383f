"""Activation memory per mixer type: the tensors autograd keeps from forward to backward, per token.

Counts are in elements of the activation dtype per token of one layer, read off each module's forward and checked
by measurement (`tests/plan/test_activations.py` counts the saved tensors with `saved_tensors_hooks` on CPU):

  every block   block input and residual (fp32 under bf16 autocast too: the residual stream is fp32), 2 fp32 norm
                statistics, 3 ffn (SwiGLU gate, up, product; silu is recomputed in backward), and the norm outputs
                as the projections read them: in fp32 one tensor each for the mixer and the MLP (2 d); under
                autocast no fp32 norm output is kept (the norm's backward needs only its input and statistic), only
                a bf16 copy per projection (2 d for the MLP, `PROJECTIONS` d for the mixer)
  attn          rotated q and k, v, the op's output, the output projection's input: 3 H hd + 2 Hkv hd, + H fp32
                log-sum-exp and the fp32 RoPE cos / sin (2 hd; the rotation's backward needs nothing else). The
                fused op keeps no mask and no [T, T] tensor, on every backend
  gdn           projections, three short convolutions (their closed-form backward keeps the input and a mask per
                tap), L2 norms, gates, output norm and the op's inputs q, k, v, g, beta: 14 H K + 11 H V + 9 H
                + 9 (fp32); the op is a custom op whose backward recomputes its forward, so no chunk matrices or
                states are kept (coefficients read off the saved tensors of this code)
  linear        9 H hd + H fp32, the op's inputs q, k, v included (read off likewise)
  conv          (k + 3) x inner channels + (k + 1) fp32 masks

Under sequence parallelism a layer holds T/W tokens, plus: allgather keeps every rank's K and V (W |kv|); ulysses
keeps its head-sharded q, k, v (in place of the rotated ones) and output (+ H hd); ring keeps what one GPU does; LASP-2
keeps the gathered chunk summaries and the entering states (a few state-sized tensors per chunk). With activation
checkpointing only each block's input (d per token) is kept, and one block's full set exists while it is
recomputed in backward.
"""
from __future__ import annotations

from lctrain.plan.comm import local_tokens

CHUNK = 64  # tokens per chunk of the linear-family kernels (triton launch tables and the torch chunk path)


# projections reading the mixer's normed input: under bf16 autocast each keeps its own bf16 copy of it
PROJECTIONS = {"attn": 3, "gdn": 6, "linear": 4, "conv": 2}


def block_elements(d_model: int, ffn: int, elem: int) -> float:
    """Saved elements per token of a block's norms, residual and MLP: the block input and the residual (fp32 under
    bf16 autocast too: the residual stream has the embedding's dtype), the two norm statistics, and the norm
    outputs as the projections read them: in fp32 the mixer's and the MLP's (one tensor each); under autocast no
    fp32 norm output is kept (the norm's backward needs only its input and statistic), only the bf16 copies each
    projection makes, 2 d for the MLP here and `PROJECTIONS` d for the mixer (measured:
    `tests/plan/test_activations.py`)."""
    f32 = 4 / elem
    return 2 * d_model * f32 + 2 * d_model + 3 * ffn + 2 * f32


def residual_bytes(elem: int) -> int:
    """Bytes per element of the residual stream (a checkpointed block's input): fp32 under bf16 autocast too."""
    return max(elem, 4)


def layer_elements(layer, d_model: int, ffn: int, elem: int, backend: str, sp: int = 1, attn: str = "allgather",
                   seq_len: int = 0) -> float:
    """Saved elements per local token for one block (no checkpointing)."""
    f32 = 4 / elem
    block = block_elements(d_model, ffn, elem) + (PROJECTIONS[layer.type] * d_model if elem < 4 else 0)
    if layer.type == "attn":
        hd = layer.head_dim
        mixer = 3 * layer.heads * hd + 2 * layer.kv_heads * hd + layer.heads * f32 + 2 * hd * f32
        if sp > 1 and attn == "allgather":   # every rank's K and V, gathered
            mixer += (sp - 1) * 2 * layer.kv_heads * hd
        if sp > 1 and attn == "ulysses":     # the head-sharded output, beside the one sent back
            mixer += layer.heads * hd
    elif layer.type == "gdn":  # (+ the L2 norms' and output norm's fp32 tensors under autocast)
        mixer = 14 * layer.heads * layer.key_dim + 11 * layer.heads * layer.value_dim + 9 * layer.heads * f32 \
            + 9 * f32 + 2 * (f32 - 1) * layer.heads * (layer.key_dim + layer.value_dim)
    elif layer.type == "linear":
        mixer = 9 * layer.heads * layer.head_dim + layer.heads * f32
    else:
        channels, kernel = layer.convs[0]
        mixer = (kernel + 3) * channels + (kernel + 1) * f32
    return block + mixer


def lasp2_state_bytes(layer, rows: int, sp: int, layout: str) -> int:
    """LASP-2's saved gathered summaries and entering states (fp32), per layer."""
    if layer.type not in ("gdn", "linear") or sp == 1:
        return 0
    num_chunks = sp * (2 if layout == "zigzag" else 1)
    state = layer.heads * layer.key_dim * layer.value_dim
    decay = layer.heads * layer.key_dim * layer.key_dim if layer.type == "gdn" else layer.heads
    return 4 * rows * num_chunks * (decay + 2 * state)


def activation_bytes(shape, rows: int, seq_len: int, sp: int, layout: str, attn: str, elem: int,
                     checkpointing: bool, backend: str) -> dict[str, int]:
    """Saved activations of one micro-batch on one GPU, by part: `layers` (all blocks, or their inputs with
    checkpointing), `recompute` (one block's full set during its backward when checkpointing), `head` (final norm
    and loss inputs), `inputs` (token ids, labels, positions)."""
    tokens = rows * local_tokens(seq_len, sp, layout)[0]
    per_layer = [(tokens * layer_elements(layer, shape.d_model, shape.ffn_dim, elem, backend, sp, attn, seq_len) * elem
                  + lasp2_state_bytes(layer, rows, sp, layout), count) for layer, count in shape.grouped()]
    if checkpointing:
        layers = len(shape.layers) * tokens * shape.d_model * residual_bytes(elem)
        recompute = max(size for size, _ in per_layer)
    else:
        layers, recompute = sum(size * count for size, count in per_layer), 0
    head = tokens * (3 * shape.d_model * residual_bytes(elem) + elem)  # final norm on the fp32 residual stream
    return {"layers": int(layers), "recompute": int(recompute), "head": int(head), "inputs": int(tokens * 3 * 8)}


def backward_working_bytes(shape, rows: int, seq_len: int, sp: int, layout: str, elem: int) -> int:
    """Gradient buffers alive beside the saved set while a block runs backward: the residual stream's gradient
    and the gradients of the mixer op's inputs (q, k, v in fp32 for the recurrent kernels). Measured peaks on CPU
    show the rest is freed about as fast as it is allocated."""
    tokens = rows * local_tokens(seq_len, sp, layout)[0]
    widest = 0
    for layer, _ in shape.grouped():
        if layer.type == "attn":
            inputs = (layer.heads + 2 * layer.kv_heads) * layer.head_dim * elem
        elif layer.type in ("gdn", "linear"):
            inputs = (2 * layer.key_dim + layer.value_dim) * layer.heads * max(elem, 4)
        else:
            inputs = layer.convs[0][0] * elem
        widest = max(widest, inputs)
    return int(tokens * (2 * shape.d_model * residual_bytes(elem) + widest))


def op_backward_elements(layer, backend: str, elem: int = 4) -> float:
    """fp32 elements per token the recurrent op's backward holds beyond its inputs' gradients: the forward it
    recomputes under autograd keeps its chunk tensors until differentiated. torch (CPU chunk path): measured with
    MemTracker inside the op, fitted within 10% (c = chunk length); triton: the Triton function's saved set, read
    off the code: fp32 beta and gates, and in the inputs' type (`elem` bytes) the two [c, c] chunk matrices, w,
    delta and the chunk states (c = 64 for bf16/fp16 inputs, 32 for fp32, as in the GDN launch table)."""
    h, k, v, c = layer.heads, layer.key_dim, layer.value_dim, CHUNK
    if layer.type == "gdn":
        if backend == "torch":
            return h * (6.5 * c + 6.25 * k + 7.3 * v)
        c = CHUNK if elem < 4 else CHUNK // 2
        return h * (2 + (2 * c + k + v + k * v / c) * elem / 4)
    if layer.type == "linear":
        return h * ((2 * c + 16.2 * k) if backend == "torch" else 1)
    return 0.0


def op_backward_bytes(shape, rows: int, seq_len: int, sp: int, layout: str, attn: str, elem: int,
                      checkpointing: bool, backend: str) -> int:
    """Bytes the peak gains over the forward's end while a recurrent op runs backward. Backward walks the blocks
    from the last: when block i's op recomputes, the blocks above have freed their saved tensors (not so with
    checkpointing, where only block i's set is counted), and so has block i's own MLP (3 ffn + 2 d) and the
    mixer's tensors after the op (output norm, gate and their product, the output projection's input: 4 H V)."""
    tokens = rows * local_tokens(seq_len, sp, layout)[0]
    freed, extra = 0.0, 0.0
    for layer in reversed(shape.layers):
        transient = tokens * 4 * op_backward_elements(layer, backend, elem)
        own = tokens * elem * (3 * shape.ffn_dim + 2 * shape.d_model + 4 * layer.heads * layer.value_dim)
        extra = max(extra, transient - own - (0 if checkpointing else freed))
        freed += tokens * elem * layer_elements(layer, shape.d_model, shape.ffn_dim, elem, backend, sp, attn, seq_len)
    return int(extra)
