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


def _filled(source):
    """A meta model checked against `source` and materialised piece by piece from it, as the fsdp build does."""
    model = _meta(_cfg())
    check(model, source)
    fill = filler(model, source)
    for name, piece in pieces(model):
        piece.to_empty(device="cpu")
        fill(name, piece)
    return model


def test_pieces_read_from_a_safetensors_file_equal_the_saved_model(base_file):
    saved, path = base_file
    source = open_source(str(path))
    model = _filled(source)
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
    """Sources that do not resolve go the host path (its own messages); an hf: directory without weights is one
    line."""
    assert open_source(str(tmp_path / "missing")) is None
    with pytest.raises(ConfigError, match=r"checkpoint.init_from: no model.safetensors \(or index\) in "):
        open_source("hf:" + str(tmp_path))


def _lora_checkpoint(model, directory, base: str):
    """`model` with adapters (B made non-zero, as after training) saved as a LoRA checkpoint over `base`."""
    from lctrain.config import LoraConfig
    from lctrain.train.lora import apply_lora, save_adapter
    lora = apply_lora(model, LoraConfig(enabled=True, r=4, alpha=8, target_modules=["q_proj", "down"]))
    with torch.no_grad():
        for name, param in lora.named_parameters():
            if "lora_B" in name or name == "norm.weight":
                param.normal_()
    directory.mkdir()
    save_adapter(lora, directory, base)
    return directory / "adapter.safetensors"


def test_a_lora_checkpoint_is_merged_tensor_by_tensor(base_file, tmp_path, capsys):
    """A LoRA checkpoint as the source: its base read piece by piece (or row range by row range) with the
    adapters merged into each tensor equals `load_merged`'s whole-model merge on the host. A LoRA checkpoint over
    another LoRA checkpoint goes the host path, and the run says so in one line."""
    from lctrain.train.checkpoint import load_weights
    saved, path = base_file
    torch.manual_seed(5)
    adapter = _lora_checkpoint(LanguageModel(_cfg()), tmp_path / "lora", str(path))
    merged = LanguageModel(_cfg())
    load_weights(merged, str(adapter))  # the host path: base, adapters, merge_lora
    assert not torch.equal(merged.layers[1].mixer.q_proj.weight, saved.layers[1].mixer.q_proj.weight)
    source = open_source(str(adapter))
    model = _filled(source)
    want = dict(merged.named_parameters())
    for name, value in model.named_parameters():
        assert torch.equal(value, want[name]), name
        rows = source.read_rows(name, 1, 3)  # what an fsdp rank reads for its shard
        torch.testing.assert_close(rows, want[name][1:3], rtol=1e-6, atol=1e-6)
    assert capsys.readouterr().err == ""

    # the same adapters as an fsdp LoRA checkpoint stores them (DCP shards in dcp/, adapter.json beside)
    import shutil
    import warnings

    import torch.distributed.checkpoint as dcp
    from safetensors.torch import load_file
    sharded = tmp_path / "lora-dcp"
    sharded.mkdir()
    shutil.copy(tmp_path / "lora" / "adapter.json", sharded / "adapter.json")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dcp.save({"model": load_file(str(adapter))}, checkpoint_id=str(sharded / "dcp"), no_dist=True)
    source = open_source(str(sharded))
    values = source.read(sorted(want))
    for name, value in values.items():
        assert torch.equal(value, want[name]), name

    nested = _lora_checkpoint(LanguageModel(_cfg()), tmp_path / "lora2", str(adapter))
    assert open_source(str(nested)) is None
    assert capsys.readouterr().err.strip().splitlines() == [
        f"checkpoint.init_from: {nested} is a LoRA checkpoint whose base ({adapter}) is not read piece by piece: "
        "base and adapters are loaded whole on the host and merged there"]


@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory):
    """A tiny Llama saved by transformers in several safetensors shards (model.safetensors.index.json)."""
    transformers = pytest.importorskip("transformers")
    from tests.train.fsdp_cases import VOCAB
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
                                      tie_word_embeddings=False)
    path = tmp_path_factory.mktemp("hf") / "llama"
    transformers.LlamaForCausalLM(config).save_pretrained(path, max_shard_size="20KB")
    assert (path / "model.safetensors.index.json").is_file() and len(list(path.glob("*.safetensors"))) > 2
    return path


def _tensor_bytes(directory) -> int:
    from safetensors.torch import load_file
    return sum(t.numel() * t.element_size() for f in directory.glob("*.safetensors") for t in load_file(f).values())


def test_hf_source_read_piece_by_piece_equals_the_host_load(hf_llama):
    """One process: every weight read from the sharded HF directory equals `load_hf_weights`'s."""
    from lctrain.export.hf_import import follow_hf_config, load_hf_weights
    cfg = ModelConfig()
    follow_hf_config(cfg, hf_llama)
    torch.manual_seed(0)
    eager = LanguageModel(cfg)
    load_hf_weights(eager, hf_llama)
    source = open_source(f"hf:{hf_llama}")
    model = _meta(cfg)
    check(model, source)
    fill = filler(model, source)
    for name, piece in pieces(model):
        piece.to_empty(device="cpu")
        fill(name, piece)
    want = dict(eager.named_parameters())
    for name, value in model.named_parameters():
        assert torch.equal(value, want[name]), name
    cfg.d_model = 48
    with pytest.raises(ConfigError, match=r"has shape \[97, 32\] in the checkpoint but \[97, 48\]"):
        check(_meta(cfg), source)


def test_hf_source_under_fsdp_reads_only_each_ranks_shards(hf_llama, tmp_path):
    """2 gloo ranks, fsdp on a meta model, `hf:` source (plain and with LoRA adapters): the weights equal the
    host-loaded ddp model's, the first step's loss and updated weights equal ddp's, the whole-model loader is
    never called (it raises in the workers), and each rank reads about half of the checkpoint's bytes."""
    import json

    import torch.multiprocessing as mp

    from tests.parallel.harness import port_for
    from tests.train import hf_source_cases
    mp.spawn(hf_source_cases.worker, args=(2, port_for("meta-source-hf"), str(tmp_path), str(hf_llama)),
             nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    total = _tensor_bytes(hf_llama)
    for rank, report in enumerate(ranks):
        for case, result in report.items():
            assert "error" not in result, (rank, case, result.get("error"))
            assert result["unequal"] == [], (rank, case)
            assert abs(result["fsdp_loss"][0] - result["ddp_loss"][0]) <= 1e-5 * abs(result["ddp_loss"][0])
            assert result["step_diff"] < 1e-5, (rank, case, result["step_diff"])
            # each rank's share of the rows (uneven splits round up), never the whole model
            assert 0.4 * total < result["bytes_read"] < 0.55 * total, (rank, case, result["bytes_read"], total)
