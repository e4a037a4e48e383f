import pytest
import torch
from safetensors.torch import save_file

from lctrain.config import Config, ModelConfig, SourceConfig
from lctrain.data.tokenizer import Tokenizer, train_tokenizer
from lctrain.models import LanguageModel
from lctrain.train.checkpoint import _model_tensors


@pytest.fixture(scope="session")
def tokenizer():
    """A small byte-fallback tokenizer that knows the passkey sentences (trained in milliseconds)."""
    lines = ["The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.",
             "The pass key is 12345. Remember it. What is the pass key? The special magic number is 7.",
             "0123456789"]
    return Tokenizer(train_tokenizer(lines, 400))


def tiny_model(vocab_size: int, pattern: str = "GA") -> LanguageModel:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=vocab_size, d_model=32, n_layers=2, n_heads=2, ffn_dim=64, pattern=pattern)
    return LanguageModel(cfg).eval()


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory, tokenizer):
    """A run directory as training leaves it: config, one checkpoint, tokenizer (no training needed)."""
    root = tmp_path_factory.mktemp("eval-run") / "run"
    model = tiny_model(tokenizer.vocab_size)
    cfg = Config()
    cfg.model = model.cfg
    cfg.data.seq_len = 64
    cfg.data.sources = [SourceConfig(type="mqar", num_kv_pairs=4, task_vocab=64)]
    cfg.run.dir = str(root)
    step = root / "checkpoints" / "step-3"
    step.mkdir(parents=True)
    save_file(_model_tensors(model), str(step / "model.safetensors"))
    (step / "config.yaml").write_text(cfg.to_yaml())
    (step / "trainer.json").write_text('{"step": 3}')
    (root / "checkpoints" / "latest").write_text("step-3")
    (root / "config.yaml").write_text(cfg.to_yaml())
    tokenizer.save(root / "tokenizer")
    return root
