"""Hybrid linear/full-attention decoder exported from lctrain, for `AutoModelForCausalLM` (trust_remote_code).

Pre-norm blocks: x + mixer(RMSNorm(x)), then x + SwiGLU(RMSNorm(x)). Mixers, one per `config.mixer_types` entry:
- `attn`: causal softmax attention, GQA, rotary embedding in the rotate-half layout.
- `gdn`: Gated DeltaNet. S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T, o_t = q_t^T S_t / sqrt(K),
  with causal short convolutions + SiLU on q, k, v, L2-normalised q, k, g_t = -exp(A_log) softplus(a(x) + dt_bias),
  beta_t = sigmoid(b(x)), output RMSNorm(o) * SiLU(gate(x)).
- `linear`: decayed linear attention. S_t = exp(log_decay_h) S_{t-1} + k_t v_t^T, o_t = q_t^T S_t / sqrt(K) with
  q, k = SiLU(.), output RMSNorm(o) * sigmoid(u(x)).

The recurrences use lctrain's kernels when lctrain is importable, fla's on CUDA when fla is, and the plain PyTorch
recurrences below otherwise (set LCTRAIN_HF_KERNELS=torch to force those). Batches must be unpadded: every row is
one sequence (an attention mask, if given, must be all ones).
"""
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_lctrain import LctrainConfig


# ---------------------------------------------------------------------------------------------- kernels
def _optional_kernels():
    """(lctrain ops, fla ops) that can be imported here; either may be empty."""
    if os.environ.get("LCTRAIN_HF_KERNELS") == "torch":
        return {}, {}
    own, fla = {}, {}
    try:
        from lctrain.kernels import gated_delta_rule, linear_attention
        own = {"gdn": gated_delta_rule, "linear": linear_attention}
    except Exception:
        pass
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
        from fla.ops.simple_gla import chunk_simple_gla
        fla = {"gdn": chunk_gated_delta_rule, "linear": chunk_simple_gla}
    except Exception:
        pass
    return own, fla


_OWN, _FLA = _optional_kernels()


def torch_gated_delta_rule(q, k, v, g, beta, scale, state):
    """Token-by-token recurrence in fp32. q, k [B, T, H, K], v [B, T, H, V], g, beta [B, T, H], state [B, H, K, V]
    or None. Returns o [B, T, H, V] and the final state."""
    q, k, v, g, beta = (t.float() for t in (q, k, v, g, beta))
    if state is None:
        state = q.new_zeros(q.shape[0], q.shape[2], q.shape[3], v.shape[3])
    outputs = []
    for t in range(q.shape[1]):
        state = state * g[:, t].exp()[..., None, None]
        remembered = torch.einsum("bhk,bhkv->bhv", k[:, t], state)  # (I - beta k k^T) S = S - beta k (k^T S)
        state = state + beta[:, t, :, None, None] * k[:, t, :, :, None] * (v[:, t] - remembered)[:, :, None, :]
        outputs.append(scale * torch.einsum("bhk,bhkv->bhv", q[:, t], state))
    return torch.stack(outputs, dim=1), state


def torch_linear_attention(q, k, v, log_decay, scale, state):
    """Token-by-token recurrence in fp32 with a per-head decay log_decay [H]."""
    q, k, v = q.float(), k.float(), v.float()
    if state is None:
        state = q.new_zeros(q.shape[0], q.shape[2], q.shape[3], v.shape[3])
    decay = log_decay.float().exp()[None, :, None, None]
    outputs = []
    for t in range(q.shape[1]):
        state = decay * state + k[:, t, :, :, None] * v[:, t, :, None, :]
        outputs.append(scale * torch.einsum("bhk,bhkv->bhv", q[:, t], state))
    return torch.stack(outputs, dim=1), state


def gated_delta_rule(q, k, v, g, beta, state):
    scale = q.shape[-1] ** -0.5
    if "gdn" in _OWN:
        return _OWN["gdn"](q, k, v, g=g, beta=beta, scale=scale, initial_state=state, output_final_state=True)
    if "gdn" in _FLA and q.is_cuda:
        return _FLA["gdn"](q, k, v, g=g, beta=beta, scale=scale, initial_state=state, output_final_state=True)
    return torch_gated_delta_rule(q, k, v, g, beta, scale, state)


def linear_attention(q, k, v, log_decay, state):
    scale = q.shape[-1] ** -0.5
    if "linear" in _OWN:
        return _OWN["linear"](q, k, v, log_decay=log_decay, scale=scale, initial_state=state,
                              output_final_state=True)
    if "linear" in _FLA and q.is_cuda:
        g = log_decay.float()[None, None, :].expand(q.shape[0], q.shape[1], -1).contiguous()
        return _FLA["linear"](q, k, v, g=g, scale=scale, initial_state=state, output_final_state=True)
    return torch_linear_attention(q, k, v, log_decay, scale, state)


# ---------------------------------------------------------------------------------------------- blocks
class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)


class MLP(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def rotate(x, position_ids, theta, scaling):
    """Rotary embedding, rotate-half layout, computed in fp32. x [B, T, H, D], position_ids [B, T]."""
    dim = x.shape[-1]
    inv_freq = (1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))).float().to(x.device)
    freqs = (position_ids.float() / scaling)[..., None] * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)[:, :, None, :]
    xf = x.float()
    half = dim // 2
    rotated = torch.cat([-xf[..., half:], xf[..., :half]], dim=-1)
    return (xf * emb.cos() + rotated * emb.sin()).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config, layer_idx, opts):
        super().__init__()
        d = config.hidden_size
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads = opts["n_heads"], opts["n_kv_heads"]
        self.head_dim = opts["head_dim"]
        self.theta, self.scaling = opts["rope_theta"], opts.get("rope_scaling", 1.0)
        self.q_proj = nn.Linear(d, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(d, self.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(d, self.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, d, bias=False)

    def forward(self, x, position_ids, cache):
        batch, seqlen, _ = x.shape
        q = self.q_proj(x).view(batch, seqlen, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(batch, seqlen, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).view(batch, seqlen, self.n_kv_heads, self.head_dim)
        q, k = rotate(q, position_ids, self.theta, self.scaling), rotate(k, position_ids, self.theta, self.scaling)
        past = 0
        if cache is not None:
            entry = cache.layer(self.layer_idx)
            if "k" in entry:
                past = entry["k"].shape[1]
                k, v = torch.cat([entry["k"], k], dim=1), torch.cat([entry["v"], v], dim=1)
            entry["k"], entry["v"] = k, v
        if self.n_kv_heads != self.n_heads:
            k = k.repeat_interleave(self.n_heads // self.n_kv_heads, dim=2)
            v = v.repeat_interleave(self.n_heads // self.n_kv_heads, dim=2)
        q_index = torch.arange(past, past + seqlen, device=x.device)
        mask = torch.arange(k.shape[1], device=x.device)[None, :] <= q_index[:, None]
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           attn_mask=mask, scale=self.head_dim ** -0.5)
        return self.o_proj(o.transpose(1, 2).reshape(batch, seqlen, -1))


class ShortConvolution(nn.Module):
    """Causal depthwise convolution + SiLU; weight [C, k], weight[:, -1] multiplies the current token."""

    def __init__(self, channels, kernel_size):
        super().__init__()
        self.kernel_size = kernel_size
        self.weight = nn.Parameter(torch.zeros(channels, kernel_size))

    def forward(self, x, entry, key):
        k = self.kernel_size
        prefix = entry.get(key) if entry is not None else None
        if prefix is None:
            prefix = x.new_zeros(x.shape[0], k - 1, x.shape[2])
        padded = torch.cat([prefix.to(x.dtype), x], dim=1)
        if entry is not None:
            entry[key] = padded[:, -(k - 1):].detach()
        out = x * self.weight[:, -1]
        for shift in range(1, k):
            out = out + padded[:, k - 1 - shift:k - 1 - shift + x.shape[1]] * self.weight[:, -1 - shift]
        return F.silu(out)


class GatedDeltaNet(nn.Module):
    def __init__(self, config, layer_idx, opts):
        super().__init__()
        d = config.hidden_size
        self.layer_idx = layer_idx
        self.n_heads, self.head_k_dim, self.head_v_dim = opts["n_heads"], opts["head_k_dim"], opts["head_v_dim"]
        key_dim, value_dim = self.n_heads * self.head_k_dim, self.n_heads * self.head_v_dim
        self.q_proj = nn.Linear(d, key_dim, bias=False)
        self.k_proj = nn.Linear(d, key_dim, bias=False)
        self.v_proj = nn.Linear(d, value_dim, bias=False)
        self.a_proj = nn.Linear(d, self.n_heads, bias=False)
        self.b_proj = nn.Linear(d, self.n_heads, bias=False)
        self.g_proj = nn.Linear(d, value_dim, bias=False)
        self.q_conv = ShortConvolution(key_dim, opts["conv_size"])
        self.k_conv = ShortConvolution(key_dim, opts["conv_size"])
        self.v_conv = ShortConvolution(value_dim, opts["conv_size"])
        self.o_norm = RMSNorm(self.head_v_dim, config.rms_norm_eps)
        self.o_proj = nn.Linear(value_dim, d, bias=False)
        self.A_log = nn.Parameter(torch.zeros(self.n_heads))
        self.dt_bias = nn.Parameter(torch.zeros(self.n_heads))

    def forward(self, x, position_ids, cache):
        batch, seqlen, _ = x.shape
        entry = cache.layer(self.layer_idx) if cache is not None else None
        q = self.q_conv(self.q_proj(x), entry, "q_conv")
        k = self.k_conv(self.k_proj(x), entry, "k_conv")
        v = self.v_conv(self.v_proj(x), entry, "v_conv")
        q = F.normalize(q.view(batch, seqlen, self.n_heads, self.head_k_dim).float(), dim=-1).to(x.dtype)
        k = F.normalize(k.view(batch, seqlen, self.n_heads, self.head_k_dim).float(), dim=-1).to(x.dtype)
        v = v.view(batch, seqlen, self.n_heads, self.head_v_dim)
        g = -self.A_log.float().exp() * F.softplus(self.a_proj(x).float() + self.dt_bias)
        beta = torch.sigmoid(self.b_proj(x).float())
        o, state = gated_delta_rule(q, k, v, g, beta, entry.get("state") if entry is not None else None)
        if entry is not None:
            entry["state"] = state.detach()
        gate = self.g_proj(x).view(batch, seqlen, self.n_heads, self.head_v_dim)
        o = self.o_norm(o.to(x.dtype)) * F.silu(gate)
        return self.o_proj(o.reshape(batch, seqlen, -1))


class LinearAttention(nn.Module):
    def __init__(self, config, layer_idx, opts):
        super().__init__()
        d = config.hidden_size
        self.layer_idx = layer_idx
        self.n_heads, self.head_dim = opts["n_heads"], opts["head_dim"]
        inner = self.n_heads * self.head_dim
        self.q_proj = nn.Linear(d, inner, bias=False)
        self.k_proj = nn.Linear(d, inner, bias=False)
        self.v_proj = nn.Linear(d, inner, bias=False)
        self.u_proj = nn.Linear(d, inner, bias=False)
        self.o_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.o_proj = nn.Linear(inner, d, bias=False)
        # The per-head decays are stored with the weights, so this file never has to re-derive lctrain's schedule.
        self.register_buffer("log_decay", torch.zeros(self.n_heads, dtype=torch.float32))

    def forward(self, x, position_ids, cache):
        batch, seqlen, _ = x.shape
        shape = (batch, seqlen, self.n_heads, self.head_dim)
        q = F.silu(self.q_proj(x)).view(shape)
        k = F.silu(self.k_proj(x)).view(shape)
        v = self.v_proj(x).view(shape)
        entry = cache.layer(self.layer_idx) if cache is not None else None
        o, state = linear_attention(q, k, v, self.log_decay.float(), entry.get("state") if entry is not None else None)
        if entry is not None:
            entry["state"] = state.detach()
        o = self.o_norm(o.to(x.dtype)) * torch.sigmoid(self.u_proj(x).view(shape))
        return self.o_proj(o.reshape(batch, seqlen, -1))


MIXERS = {"attn": Attention, "gdn": GatedDeltaNet, "linear": LinearAttention}


class DecoderLayer(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        kind = config.mixer_types[layer_idx]
        if kind not in MIXERS:
            raise ValueError(f"layer {layer_idx}: mixer type {kind!r} is not supported by this modeling file "
                             f"(supported: {', '.join(MIXERS)})")
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mixer = MIXERS[kind](config, layer_idx, config.mixer_config[kind])
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config.hidden_size, config.intermediate_size)

    def forward(self, x, position_ids, cache):
        x = x + self.mixer(self.input_layernorm(x), position_ids, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class LctrainCache:
    """Decoding state per layer (attention keys/values; recurrent state and convolution inputs), plus the number
    of tokens already consumed. Not a transformers `Cache`: generate() hands it back through `past_key_values`."""

    def __init__(self):
        self.layers = {}
        self.seen_tokens = 0

    def layer(self, idx):
        return self.layers.setdefault(idx, {})

    def get_seq_length(self, layer_idx=0):
        return self.seen_tokens

    def reorder_cache(self, beam_idx):
        for entry in self.layers.values():
            for key, value in entry.items():
                entry[key] = value.index_select(0, beam_idx.to(value.device))


# ---------------------------------------------------------------------------------------------- models
class LctrainPreTrainedModel(PreTrainedModel):
    config_class = LctrainConfig
    base_model_prefix = "model"
    _no_split_modules = ["DecoderLayer"]
    _supports_cache_class = False

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            module.weight.data.normal_(0.0, std)
        elif isinstance(module, nn.Embedding):
            module.weight.data.normal_(0.0, std)


class LctrainModel(LctrainPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(self, input_ids=None, position_ids=None, cache=None, inputs_embeds=None):
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        batch, seqlen = x.shape[:2]
        if position_ids is None:
            start = cache.seen_tokens if cache is not None else 0
            position_ids = torch.arange(start, start + seqlen, device=x.device).expand(batch, seqlen)
        for layer in self.layers:
            x = layer(x, position_ids, cache)
        if cache is not None:
            cache.seen_tokens += seqlen
        return self.norm(x)


class LctrainForCausalLM(LctrainPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config):
        super().__init__(config)
        self.model = LctrainModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls):
        return False  # the recurrent layers keep their own state: see LctrainCache

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def prepare_inputs_for_generation(self, input_ids, past_key_values=None, attention_mask=None, use_cache=True,
                                      **kwargs):
        if past_key_values is not None:
            input_ids = input_ids[:, past_key_values.seen_tokens:]  # only the tokens the state has not seen
        return {"input_ids": input_ids, "past_key_values": past_key_values, "attention_mask": attention_mask,
                "use_cache": use_cache}

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0, **kwargs):
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            raise ValueError("padded batches are not supported: the recurrent layers would read the padding; "
                             "generate one sequence at a time or pass equal-length prompts")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        cache = past_key_values
        if use_cache and cache is None:
            cache = LctrainCache()
        hidden = self.model(input_ids, position_ids, cache if use_cache else None, inputs_embeds)
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                   labels[:, 1:].reshape(-1), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=cache if use_cache else None)
