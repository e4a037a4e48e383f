"""The tokenizer of an export: lctrain's sentencepiece model as files transformers' AutoTokenizer loads.

`tokenizer.model` plus a `LlamaTokenizer` config with `legacy: false` and `add_prefix_space: false` reproduces
lctrain's encoding exactly (lctrain trains with identity normalisation and no dummy prefix); transformers then
writes its `tokenizer.json` too, so loading later needs neither sentencepiece nor a conversion.

Hybrid exports name `tokenization_lctrain.LctrainTokenizer` in `auto_map` (so AutoTokenizer needs
trust_remote_code=True, as it already does to read their config): transformers 5 drops `add_bos_token` from
the config of a tokenizer.json-backed Llama tokenizer, which then reads False although BOS is added.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from lctrain.data.tokenizer import Tokenizer

SPECIAL_PIECES = {"pad": "<pad>", "unk": "<unk>", "bos": "<s>", "eos": "</s>"}


def special_ids(tokenizer: Tokenizer) -> dict:
    """Token ids for config.json and generation_config.json."""
    return {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id}


def _piece(pieces, token_id: int, fallback: str) -> str:
    if 0 <= token_id < pieces.get_piece_size():
        return pieces.id_to_piece(token_id)
    return fallback


def write_tokenizer(tokenizer: Tokenizer, out_dir: Path, max_length: int | None, remote_code: bool = False) -> None:
    """`max_length` None: no length limit (transformers' default model_max_length, a very large number)."""
    import sentencepiece as spm

    out_dir = Path(out_dir)
    tokenizer.save(out_dir)
    pieces = spm.SentencePieceProcessor(model_proto=tokenizer.model_proto)
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "bos_token": _piece(pieces, tokenizer.bos_id, SPECIAL_PIECES["bos"]),
        "eos_token": _piece(pieces, tokenizer.eos_id, SPECIAL_PIECES["eos"]),
        "unk_token": _piece(pieces, tokenizer.unk_id, SPECIAL_PIECES["unk"]),
        "pad_token": _piece(pieces, tokenizer.pad_id, SPECIAL_PIECES["pad"]),
        # lctrain's packing adds BOS/EOS itself; encode() through transformers adds BOS like Llama does.
        "add_bos_token": True,
        "add_eos_token": False,
        "legacy": False,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        **({"model_max_length": max_length} if max_length is not None else {}),
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    _add_fast_tokenizer(out_dir)
    # transformers' save drops the BOS/EOS flags and adds loading-time keys: write the config we mean.
    saved = json.loads((out_dir / "tokenizer_config.json").read_text())
    for key in ("is_local", "local_files_only", "model_max_length"):
        saved.pop(key, None)
    saved.update({k: config[k] for k in ("add_bos_token", "add_eos_token", "model_max_length") if k in config})
    if remote_code:
        saved["auto_map"] = {"AutoTokenizer": [None, "tokenization_lctrain.LctrainTokenizer"]}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")


def _add_fast_tokenizer(out_dir: Path) -> None:
    """Let transformers convert the sentencepiece model once and save the result beside it."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local directory: never ask the Hub
    from transformers import AutoTokenizer

    loaded = AutoTokenizer.from_pretrained(str(out_dir))
    loaded.save_pretrained(str(out_dir))
