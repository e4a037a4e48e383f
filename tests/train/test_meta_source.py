"""checkpoint.init_from for a meta-built (fsdp) model: sources read piece by piece, and a source that does not fit
the model refused in one line before anything is allocated."""
import pytest
import torch
from safetensors.torch import save_file

from lctrain.config import ConfigError, ModelConfig
from lctrain.models import LanguageModel
from lctrain.models.init import parameters_on_meta
from lctrain.train.meta_init import pieces
from lctrain.train.meta_source import check, filler, open_source


def _cfg(d_model=32) -> ModelConfig:
    return ModelConfig(vocab_size=97, d_model=d_model, n_layers=2, n_heads=2, ffn_dim=64, pattern="GA")


def _meta(cfg) -> LanguageModel:
    with parameters_on_meta():
        return LanguageModel(cfg)


@pytest.fixture()
def base_file(tmp_path):
    torch.manual_seed(3)
    model = LanguageModel(_cfg())
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return model, path


def test_pieces_read_from_a_safetensors_file_equal_the_saved_model(base_file):
    saved, path = base_file
    source = open_source(str(path))
    model = _meta(_cfg())
    check(model, source)
    fill = filler(model, source)
    for name, piece in pieces(model):
        piece.to_empty(device="cpu")
        fill(name, piece)
    want = dict(saved.named_parameters())
    for name, value in model.named_parameters():
        assert torch.equal(value, want[name]), name


def test_a_source_of_another_shape_is_refused_in_one_line(base_file):
    _, path = base_file
    with pytest.raises(ConfigError, match=r"checkpoint.init_from: .* has shape \[97, 32\] in the checkpoint but "
                                          r"\[97, 48\] in this model"):
        check(_meta(_cfg(48)), open_source(str(path)))
    deeper = _cfg()
    deeper.n_layers, deeper.pattern = 3, "GAG"
    with pytest.raises(ConfigError, match=r"missing \['layers.2"):
        check(_meta(deeper), open_source(str(path)))


def test_sources_loaded_whole_on_the_host(tmp_path):
    """hf: directories (names converted) and sources that do not resolve go the host path (its own messages)."""
    assert open_source("hf:" + str(tmp_path)) is None
    assert open_source(str(tmp_path / "missing")) is None
