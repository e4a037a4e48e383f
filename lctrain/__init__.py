"""lctrain: training long-context hybrid linear/full-attention language models."""

__version__ = "0.1.0"


def load_model(path, device="cpu"):
    """(model, tokenizer) from a run directory, a checkpoint directory or a Hugging Face export;
    `model(input_ids)` returns logits [B, T, vocab]. See `lctrain.export.load`."""
    from lctrain.export.load import load_model as _load

    return _load(path, device)
