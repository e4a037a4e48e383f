"""Every shipped recipe loads, validates and builds its model (on the meta device: no memory, no data)."""
from pathlib import Path

import pytest
import torch

from lctrain.config import load_config
from lctrain.models import LanguageModel

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))


def build(path, *overrides):
    cfg = load_config(path, ["model.vocab_size=32000", *overrides])
    with torch.device("meta"):
        return cfg, LanguageModel(cfg.model)


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_builds(path):
    cfg, model = build(path)
    assert len(model.layer_types) == cfg.model.n_layers
    assert model.num_parameters() > 0


@pytest.mark.parametrize("name,every,size", [("hybrid_3to1", 4, 335e6), ("hybrid_6to1", 7, 300e6)])
def test_hybrid_placement_and_size(name, every, size):
    _, model = build(Path(__file__).resolve().parents[1] / "recipes" / f"{name}.yaml")
    attn = [i for i, t in enumerate(model.layer_types) if t == "attn"]
    assert attn == list(range(every - 1, len(model.layer_types), every))
    assert set(model.layer_types) == {"gdn", "attn"}
    assert abs(model.num_parameters() - size) / size < 0.05


def test_tiny_is_a_3to1_hybrid():
    _, model = build(Path(__file__).resolve().parents[1] / "recipes" / "tiny.yaml")
    assert model.layer_types == ["gdn", "gdn", "gdn", "attn"]
