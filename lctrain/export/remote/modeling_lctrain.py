"""Hybrid decoder exported from lctrain, for `AutoModelForCausalLM` (trust_remote_code).

Pre-norm blocks: x + mixer(RMSNorm(x)), then x + SwiGLU(RMSNorm(x)). One mixer per `config.mixer_types` entry:
`attn`, `swa`, `landmark` (lctrain_attention.py), `gdn`, `linear`, `based`, `conv` (lctrain_recurrent.py) and
`titans` (lctrain_titans.py); their ops are in lctrain_ops.py.

The ops use lctrain's kernels when lctrain is importable, fla's on CUDA when fla is (gdn, linear), and plain
PyTorch otherwise (set LCTRAIN_HF_KERNELS=torch to force those).

Batches may be padded on either side (`attention_mask`, 0 = padding): no layer reads a padding token or lets it
change a state, and positions count real tokens, so each row computes what it would alone. The cache is an
`LctrainCache` (a transformers `Cache`), passed as `cache` (transformers 5) or `past_key_values` (older);
`generate` feeds one token per step after the prompt, and beam search reorders every layer's state. Training-mode
forwards build no cache; `gradient_checkpointing_enable()` recomputes each decoder layer in the backward pass.
"""
import inspect

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils import logging

from .configuration_lctrain import LctrainConfig
from .lctrain_attention import Attention, LandmarkAttention, SlidingWindowAttention
from .lctrain_blocks import MLP, RMSNorm
from .lctrain_cache import LctrainCache
from .lctrain_context import StepContext
from .lctrain_recurrent import BasedLinearAttention, GatedConvolution, GatedDeltaNet, LinearAttention
from .lctrain_titans import Titans

logger = logging.get_logger(__name__)

MIXERS = {"attn": Attention, "gdn": GatedDeltaNet, "linear": LinearAttention, "swa": SlidingWindowAttention,
          "based": BasedLinearAttention, "conv": GatedConvolution, "landmark": LandmarkAttention, "titans": Titans}
# nn.Linear modules a LoRA adapter can target, per mixer type (names inside `model.layers.i.mixer`), and the MLP's.
LORA_TARGETS = {
    "attn": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "swa": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "landmark": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "gdn": ("q_proj", "k_proj", "v_proj", "a_proj", "b_proj", "g_proj", "o_proj"),
    "linear": ("q_proj", "k_proj", "v_proj", "u_proj", "o_proj"),
    "based": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "conv": ("in_proj", "gate_proj", "out_proj"),
    "titans": ("mem_qkv", "mem_gates", "attn_qkv", "mem_read_q", "readout_proj", "attn_out", "o_proj"),
    "mlp": ("gate_proj", "up_proj", "down_proj"),
}
# The output field that carries the cache: `cache` in transformers 5, `past_key_values` before.
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


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

    def forward(self, x, ctx, cache):
        x = x + self.mixer(self.input_layernorm(x), ctx, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


# ---------------------------------------------------------------------------------------------- models
class LctrainPreTrainedModel(PreTrainedModel):
    config_class = LctrainConfig
    base_model_prefix = "model"
    _no_split_modules = ["DecoderLayer"]
    supports_gradient_checkpointing = True
    _supports_cache_class = True
    _is_stateful = True  # recurrent states: no cache cropping, so no assisted decoding

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
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                output_hidden_states=False):
        """Returns (final hidden [B, T, D], hidden states per layer or None). hidden states: the embeddings, then
        every layer's output, the last one after the final norm (as Llama reports them)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        batch, seqlen = x.shape[:2]
        ctx, current = StepContext.build(batch, seqlen, x.device, attention_mask, position_ids, cache)
        checkpointing = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        if checkpointing and cache is not None:
            logger.warning_once("gradient checkpointing recomputes layers in the backward pass, which would write "
                                "the cache twice: running this forward without a cache")
            cache = None
        states = [x] if output_hidden_states else None
        for layer in self.layers:
            if checkpointing:
                x = self._gradient_checkpointing_func(layer.__call__, x, ctx, None)
            else:
                x = layer(x, ctx, cache)
            if states is not None:
                states.append(x)
        if cache is not None:
            cache.record(ctx.positions, current)
            cache.has_padding = cache.has_padding or ctx.valid is not None
        hidden = self.norm(x)
        if states is not None:
            states[-1] = hidden
        return hidden, (tuple(states) if states is not None else None)


def causal_lm_loss(logits, labels, num_items_in_batch=None):
    """Mean next-token cross-entropy over labels != -100 (or the sum divided by `num_items_in_batch`, which the
    Trainer passes under gradient accumulation)."""
    targets = F.pad(labels, (0, 1), value=-100)[:, 1:].to(logits.device)
    reduction = "mean" if num_items_in_batch is None else "sum"
    loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100,
                           reduction=reduction)
    if num_items_in_batch is not None:
        loss = loss / torch.as_tensor(num_items_in_batch, device=loss.device)
    return loss


class LctrainForCausalLM(LctrainPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config):
        super().__init__(config)
        self.model = LctrainModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def lora_target_modules(self, mlp=True):
        """Names for peft's `LoraConfig(target_modules=...)` covering every mixer of this model (and the MLPs)."""
        kinds = list(dict.fromkeys(self.config.mixer_types)) + (["mlp"] if mlp else [])
        present = {name.rsplit(".", 1)[-1] for name, module in self.named_modules() if isinstance(module, nn.Linear)}
        return sorted({n for kind in kinds for n in LORA_TARGETS[kind] if n in present})

    def new_cache(self):
        return LctrainCache(self.config.num_hidden_layers)

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        """generate() starts from an empty LctrainCache (a DynamicCache cannot hold recurrent states), unless the
        caller passed a cache or use_cache=False."""
        if any(model_kwargs.get(name) is not None for name in ("cache", "past_key_values")):
            return
        if generation_config.use_cache is False:
            return
        name = "cache" if "cache" in inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters \
            else "past_key_values"
        model_kwargs[name] = self.new_cache()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                labels=None, use_cache=None, output_attentions=None, output_hidden_states=None, return_dict=None,
                logits_to_keep=0, past_key_values=None, num_items_in_batch=None, **kwargs):
        if past_key_values is not None:  # the pre-5 name of `cache`
            if cache is not None and cache is not past_key_values:
                raise ValueError("pass the cache once, as `cache` (or `past_key_values`), not both")
            cache = past_key_values
        if cache is not None and not isinstance(cache, LctrainCache):
            raise ValueError(f"cache must be an LctrainCache (model.new_cache(), or the one a previous call "
                             f"returned); got {type(cache).__name__}")
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training
        if use_cache and cache is None:
            if self.training and torch.is_grad_enabled():
                logger.warning_once("use_cache=True ignored in training mode: the cache is only built for inference")
            else:
                cache = self.new_cache()
        if output_attentions:
            logger.warning_once("output_attentions: lctrain mixers compute no attention matrix (fused and recurrent "
                                "kernels); attentions are returned as None")
        output_hidden_states = (self.config.output_hidden_states if output_hidden_states is None
                                else output_hidden_states)
        hidden, states = self.model(input_ids, attention_mask, position_ids, cache, inputs_embeds,
                                    output_hidden_states=output_hidden_states)
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            hidden = hidden[:, -logits_to_keep:]
        elif not isinstance(logits_to_keep, int):
            hidden = hidden[:, logits_to_keep]
        logits = self.lm_head(hidden)
        loss = causal_lm_loss(logits, labels, num_items_in_batch) if labels is not None else None
        output = CausalLMOutputWithPast(loss=loss, logits=logits, hidden_states=states,
                                        **{CACHE_FIELD: cache})
        return_dict = getattr(self.config, "return_dict", True) if return_dict is None else return_dict
        return output if return_dict else output.to_tuple()
