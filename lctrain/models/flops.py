"""Model FLOPs per token, for MFU.

Training FLOPs per token = 6 * N + 6 * L_attn * H * d_head * T_ctx, where N counts every matmul parameter the token
passes through (all non-embedding weights plus the LM head; the input embedding is a lookup), and the second term is
the causal-attention score/value work of the full-attention layers only: 2 matmuls * 2 FLOPs * H * d_head per key,
averaged over T_ctx/2 visible keys (causal), times 3 for forward + backward = 6 * H * d_head * T_ctx per layer.
Linear-family mixers' state updates are linear in T and are covered by their projection parameters to first order.
"""
from __future__ import annotations

# Dense bf16 tensor-core peaks (no sparsity), FLOP/s, by a substring of torch.cuda.get_device_name().
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "A10G": 125e12, "L40S": 362e12, "L4": 121e12,
                   "4090": 165e12, "3090": 71e12, "V100": 125e12}


def flops_per_token(model, seq_len: int) -> float:
    cfg = model.cfg
    matmul_params = model.num_parameters(exclude_embedding=True)
    if model.lm_head is None:  # tied: the head reuses the embedding matrix but still costs a matmul
        matmul_params += model.embed.weight.numel()
    n_attn = sum(1 for t in model.layer_types if t == "attn")
    head_dim = cfg.head_dim or cfg.d_model // cfg.n_heads
    return 6.0 * matmul_params + 6.0 * n_attn * cfg.n_heads * head_dim * seq_len


def peak_flops(device_name: str) -> float | None:
    for key, value in PEAK_BF16_FLOPS.items():
        if key in device_name:
            return value
    return None
