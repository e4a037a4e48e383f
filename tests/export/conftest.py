import glob
import sysconfig

import pytest
import torch

from lctrain.config import ModelConfig
from lctrain.data.tokenizer import Tokenizer, train_tokenizer
from lctrain.models import LanguageModel


@pytest.fixture(scope="session")
def tokenizer() -> Tokenizer:
    """A small byte-fallback BPE model trained on a few standard-library files (well under a second)."""
    lines = []
    for path in sorted(glob.glob(sysconfig.get_paths()["stdlib"] + "/*.py"))[:20]:
        with open(path, errors="replace") as f:
            lines += [line for line in f.read().splitlines() if line.strip()]
    return Tokenizer(train_tokenizer(lines, 400))


def tiny_model(vocab: int, pattern: str, **overrides) -> LanguageModel:
    """A randomly initialised model; the decay/gate parameters get non-trivial values from their own init."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=vocab, d_model=64, n_layers=len(pattern), n_heads=4, ffn_dim=96,
                      pattern=pattern, **overrides)
    return LanguageModel(cfg).eval()


def lctrain_logits(model: LanguageModel, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, return_logits=True).logits
