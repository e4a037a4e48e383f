"""`checkpoint.init_from: hf:DIR` under `train.engine: fsdp` through the CLI: a sharded save_pretrained directory
read shard by shard into the meta-built model trains like the ddp run from the same checkpoint."""
import math

import pytest

from tests.export.test_hf_import import save_tiny_llama
from tests.train.conftest import run_lctrain, train_losses

pytest.importorskip("transformers")


@pytest.mark.slow
def test_fsdp_init_from_a_sharded_hf_dir_trains_like_ddp(cache_dir, tmp_path, tokenizer):
    hf_dir = tmp_path / "llama"
    save_tiny_llama(tmp_path / "whole", vocab=tokenizer.vocab_size).save_pretrained(hf_dir, max_shard_size="100KB")
    assert (hf_dir / "model.safetensors.index.json").is_file()
    tokenizer.save(hf_dir)
    same = ["model.pattern=A", "model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.ffn_dim=160"]
    args = [f"checkpoint.init_from=hf:{hf_dir}", *same, "train.steps=2", "train.micro_batch_size=1",
            "train.tokens_per_step=256", "train.dtype=float32"]
    run_lctrain(cache_dir, tmp_path / "ddp", *args, nproc=2, timeout=600)
    run_lctrain(cache_dir, tmp_path / "fsdp", *args, "train.engine=fsdp", nproc=2, timeout=600)
    a, b = train_losses(tmp_path / "ddp"), train_losses(tmp_path / "fsdp")
    assert len(a) == 2 and sorted(a) == sorted(b), (a, b)
    assert all(math.isclose(a[k], b[k], rel_tol=1e-5) for k in a), (a, b)
