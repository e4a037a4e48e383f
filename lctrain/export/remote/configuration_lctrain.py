"""Configuration of an lctrain hybrid decoder exported to the Hugging Face format.

`mixer_types` names the sequence mixer of every layer (`attn`, `gdn`, `linear`, `swa`, `based`, `conv`,
`landmark`, `titans`); `layer_types` says the same in transformers' vocabulary (`full_attention`,
`linear_attention`, `sliding_attention`, `conv`, `hybrid`); `mixer_config` holds the resolved options of each
mixer type (heads, head sizes, convolution width, window, RoPE, memory settings).

Landmark layers: exported inference uses the training-time path (the full grouped softmax over every earlier
block, i.e. lctrain's decoding with retrieve_top_k = 0), whatever `retrieve_top_k` says; the cache keeps every
key and value. Landmark tokens are not inserted for you: `landmark_token_id` (the last vocabulary id) must end
every block of `block_size` tokens, as lctrain's data pipeline places it.

`max_position_embeddings` is the longest input the export is known to handle (None: no limit); `context_limits`
gives it per mixer type and `trained_length` is the training context length.
"""
from transformers import PretrainedConfig


class LctrainConfig(PretrainedConfig):
    model_type = "lctrain"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(self, vocab_size=32000, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=None, head_dim=None, mixer_types=None,
                 layer_types=None, mixer_config=None, rms_norm_eps=1e-6, rope_theta=None, rope_parameters=None,
                 max_position_embeddings=2048,
                 initializer_range=0.02, use_cache=True, tie_word_embeddings=True, hidden_act="silu",
                 **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.mixer_types = list(mixer_types or ["attn"] * num_hidden_layers)
        if len(self.mixer_types) != num_hidden_layers:
            raise ValueError(f"mixer_types has {len(self.mixer_types)} entries for {num_hidden_layers} layers")
        self.layer_types = list(layer_types or ["full_attention" if t == "attn" else "linear_attention"
                                                for t in self.mixer_types])
        self.mixer_config = dict(mixer_config or {})
        self.rms_norm_eps = rms_norm_eps
        # One RoPE field, in transformers 5's format; a flat `rope_theta` (older exports) is folded into it.
        self.rope_parameters = dict(rope_parameters or {"rope_type": "default"})
        self.rope_parameters.setdefault("rope_theta", 10000.0 if rope_theta is None else float(rope_theta))
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        self.hidden_act = hidden_act
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

    @property
    def rope_theta(self):
        """The model-wide RoPE base (mixers carry their own in `mixer_config`)."""
        return self.rope_parameters["rope_theta"]
