"""`{type: hf}` sources: a save_to_disk directory read in place, in row-range shards, with one-line errors."""
import datasets
import pytest

from lctrain.config import ConfigError
from lctrain.data import build_data, hf_source


@pytest.fixture
def saved(tmp_path):
    rows = [f"document {i}: river stone cloud light" for i in range(120)]
    rows[7] = None  # null rows are skipped like everywhere else
    ds = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"content": rows, "n": list(range(120))}),
                               "validation": datasets.Dataset.from_dict({"content": ["held out text"] * 5})})
    ds.save_to_disk(str(tmp_path / "ds"))
    return tmp_path / "ds"


def test_hf_dataset_from_disk_in_row_shards(saved, make_cfg, monkeypatch):
    monkeypatch.setattr(hf_source, "HF_SHARD_ROWS", 50)
    cfg = make_cfg([{"type": "hf", "name": str(saved), "field": "content"}], "data.num_workers=1")
    cfg.data.eval_sources = [type(cfg.data.sources[0])(type="hf", name=str(saved), split="validation",
                                                        field="content")]
    data = build_data(cfg, progress=False)
    assert data.plan["shards"] == 3 + 1
    assert len(data.tokens[0].train) == 119 and len(data.tokens[1].eval) == 5
    texts = [data.tokenizer.decode(data.tokens[0].train.document(i).tolist()) for i in range(3)]
    assert texts == [f"document {i}: river stone cloud light" for i in range(3)]
    assert not list((saved.parent / "cache").glob("**/*.arrow"))  # no copy of the text in the cache
    assert build_data(cfg, progress=False).plan["build"]["built"] == 0


@pytest.mark.parametrize("override, message", [
    ({"field": "missing"}, r"^data\.sources\[0\]\.field: 'missing' is not a column .*content, n"),
    ({"field": "n"}, r"^data\.sources\[0\]\.field: column 'n' .* not text"),
    ({"split": "test"}, r"^data\.sources\[0\]\.split: 'test' is not a split .*train, validation"),
    ({"name": "no-such/dataset-xyz"}, r"^data\.sources\[0\]\.name: cannot open the Hugging Face dataset"),
])
def test_hf_errors_are_one_line(saved, make_cfg, override, message):
    spec = {"type": "hf", "name": str(saved), "field": "content", **override}
    with pytest.raises(ConfigError, match=message) as err:
        build_data(make_cfg([spec], "data.num_workers=1"), progress=False)
    assert "\n" not in str(err.value)
