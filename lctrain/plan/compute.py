"""Training FLOPs per micro-batch on one GPU, by kernel family.

  matmul     6 N per token (N: every weight a token passes through, as in `lctrain.models.flops`), + 2 N' with
             activation checkpointing (the recomputed forward; N' leaves out each block's last projection, whose
             output nothing saves, so the recomputation stops before it). The LM head is part of N: the fused
             cross-entropy (`lctrain.models.loss`) forms its gradients in forward and recomputes nothing
  attention  the fused attention op (`lctrain.kernels.attention`, every path, SP blocks included): forward 2
             matmuls per visible query-key pair (S = q k^T, o = P v), backward 5 (S again from the saved
             log-sum-exp, dP = dO v^T, dV, dQ, dK): 14 H hd per visible pair, + 4 H hd with checkpointing (the
             recomputed forward). One document per sample, so a query at position t sees t + 1 keys (on average
             about T/2). The MFU numerator keeps the model count (`lctrain.models.flops`: 12 H hd per pair)
  recurrent  the chunked kernels' matmuls, per token and head, forward (c = chunk length; counted with torch's
             flop counter on the chunk path, rows of one document):
               gdn     6 c K + 4 c V + 6 K V   (k k^T, q k^T, the WY solve with the chunk inverse, w S, q S,
                                                qk delta, k^T delta)
               linear  2 c K + 2 c V + 4 K V   (q k^T, (q k^T) v, q S, k^T v)
             x 4 for forward + backward: the op is a custom op whose backward recomputes its forward (1) and
             differentiates it (2); + 1 with checkpointing (the block's recomputed forward runs the op once more)
Under sequence parallelism a GPU holds T/W tokens. The SP attention skips the blocks no query can see (host
metadata), so a rank's attention work is its queries' visible pairs: zigzag balances it, contiguous gives the last
rank (the one the step waits for) queries that see the whole prefix; ulysses computes H/W heads over the whole
sequence on every rank, balanced under either layout.
"""
from __future__ import annotations

from lctrain.plan.activations import CHUNK
from lctrain.plan.comm import local_tokens


def model_flops_per_token(shape, seq_len: int) -> float:
    """The MFU numerator of `lctrain.models.flops.flops_per_token` (6 N + 6 H hd T per attention layer), from the
    shape at any length."""
    return 6.0 * shape.matmul_params + sum(6.0 * count * layer.heads * layer.head_dim * seq_len
                                           for layer, count in shape.grouped() if layer.type == "attn")


def recurrent_flops_per_token(layer) -> float:
    """Forward FLOPs of the recurrent op per token (all heads)."""
    c, k, v = CHUNK, layer.key_dim, layer.value_dim
    if layer.type == "gdn":
        return layer.heads * (6 * c * k + 4 * c * v + 6 * k * v)
    if layer.type == "linear":
        return layer.heads * (2 * c * k + 2 * c * v + 4 * k * v)
    return 0.0


def visible_keys_per_query(seq_len: int, sp: int, layout: str, causal: bool = True, attn: str = "allgather") -> float:
    """Average keys a query of the busiest SP rank attends to (causal, one document per sample)."""
    if not causal:
        return float(seq_len)
    if sp == 1 or layout == "zigzag" or attn == "ulysses":
        return (seq_len + 1) / 2
    t_local = local_tokens(seq_len, sp, layout)[0]
    return seq_len - t_local / 2 + 0.5   # last rank: its queries see everything before them


def flops_per_micro_step(shape, rows: int, seq_len: int, sp: int, layout: str, checkpointing: bool,
                         causal: bool = True, attn: str = "allgather") -> dict[str, float]:
    """FLOPs of one micro-batch's forward + backward on the busiest GPU, by family. `causal=False` counts every
    query-key pair."""
    tokens = rows * local_tokens(seq_len, sp, layout)[0]
    passes = 5 if checkpointing else 4   # forwards: the step's, the op backward's (+ the checkpoint's); backward 2
    head = shape.vocab_size * shape.d_model
    layer_params = shape.matmul_params - head
    recomputed = layer_params - len(shape.layers) * shape.d_model * shape.ffn_dim if checkpointing else 0
    matmul = tokens * (6 * (layer_params + head) + 2 * recomputed)
    keys = visible_keys_per_query(seq_len, sp, layout, causal, attn)
    per_pair = 18 if checkpointing else 14
    attention = sum(count * tokens * per_pair * layer.heads * layer.head_dim * keys for layer, count
                    in shape.grouped() if layer.type == "attn")
    recurrent = sum(count * tokens * passes * recurrent_flops_per_token(layer) for layer, count in shape.grouped())
    return {"matmul": matmul, "attention": attention, "recurrent": recurrent}
