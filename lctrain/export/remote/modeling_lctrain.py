"""Hybrid decoder exported from lctrain, for `AutoModelForCausalLM` (trust_remote_code).

Pre-norm blocks: x + mixer(RMSNorm(x)), then x + SwiGLU(RMSNorm(x)). One mixer per `config.mixer_types` entry:
`attn`, `swa`, `landmark` (lctrain_attention.py), `gdn`, `linear`, `based`, `conv` (lctrain_recurrent.py) and
`titans` (lctrain_titans.py); their ops are in lctrain_ops.py.

The ops use lctrain's kernels when lctrain is importable, fla's on CUDA when fla is (gdn, linear), and plain
PyTorch otherwise (set LCTRAIN_HF_KERNELS=torch to force those). Batches must be unpadded: every row is one
sequence (an attention mask, if given, must be all ones).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_lctrain import LctrainConfig
from .lctrain_attention import Attention, LandmarkAttention, SlidingWindowAttention
from .lctrain_blocks import MLP, RMSNorm
from .lctrain_recurrent import BasedLinearAttention, GatedConvolution, GatedDeltaNet, LinearAttention
from .lctrain_titans import Titans

MIXERS = {"attn": Attention, "gdn": GatedDeltaNet, "linear": LinearAttention, "swa": SlidingWindowAttention,
          "based": BasedLinearAttention, "conv": GatedConvolution, "landmark": LandmarkAttention, "titans": Titans}


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
