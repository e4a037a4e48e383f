"""Tokenizer of an lctrain hybrid export: Llama's sentencepiece-BPE tokenizer (loaded from tokenizer.json) with
the special-token flags it really uses. transformers 5 ignores `add_bos_token`/`add_eos_token` from
tokenizer_config.json when tokenizer.json is present (its post-processor adds BOS), so the plain class would report
add_bos_token=False while adding BOS; this class reports the flags the post-processor applies."""
try:  # transformers 5: one tokenizers-backed class
    from transformers import LlamaTokenizer as _LlamaTokenizer
    from transformers.tokenization_utils_tokenizers import TokenizersBackend as _Backend
    _BASE = _LlamaTokenizer if issubclass(_LlamaTokenizer, _Backend) else None
except ImportError:
    _BASE = None
if _BASE is None:  # transformers 4: the fast class
    from transformers import LlamaTokenizerFast as _BASE


class LctrainTokenizer(_BASE):
    def __init__(self, *args, add_bos_token=True, add_eos_token=False, **kwargs):
        super().__init__(*args, add_bos_token=add_bos_token, add_eos_token=add_eos_token, **kwargs)
        # Set after the base init, which (transformers 5, tokenizer.json present) never receives the flags.
        self._add_bos_token, self._add_eos_token = add_bos_token, add_eos_token
