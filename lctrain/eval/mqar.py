"""`mqar`: multi-query associative recall accuracy at given (sequence length, number of key-value pairs).

Documents come from `lctrain.data.synthetic.mqar_documents`, the generator the `mqar` training source uses, each
fed as `[BOS] + document` of exactly `seq_len` tokens. The model reads the whole document once (teacher forcing,
as in Zoology) and is scored only at the query keys: a query is right when the argmax of the logits there is its
value. Accuracy is the fraction of queries answered right over `trials` documents.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from lctrain.config import ConfigError
from lctrain.data.synthetic import mqar_documents, rng_for, task_id_base


@dataclass
class MQARSetting:
    seq_len: int
    num_kv_pairs: int


def mqar_task_vocab(config) -> int | None:
    """`task_vocab` of the run's first `mqar` source (the ids its model was trained on), if any."""
    for source in (config.data.sources if config is not None else []):
        if getattr(source, "type", None) == "mqar":
            return source.task_vocab
    return None


@torch.no_grad()
def evaluate_mqar(model, settings: list[MQARSetting], tokenizer=None, task_vocab: int = 256, trials: int = 256,
                  batch_size: int = 32, seed: int = 0, vocab_size: int | None = None, progress: bool = True) -> list[dict]:
    """One result per setting: `{"seq_len", "num_kv_pairs", "accuracy", "correct", "queries"}`."""
    base = task_id_base(tokenizer)
    bos = tokenizer.bos_id if tokenizer is not None else 2
    pad = tokenizer.pad_id if tokenizer is not None else 0
    if vocab_size is not None and base + task_vocab > vocab_size:
        raise ConfigError(f"eval --task-vocab: ids {base}..{base + task_vocab - 1} do not fit the model's "
                          f"{vocab_size} ids; lower --task-vocab")
    for s in settings:
        if s.num_kv_pairs > task_vocab // 2 or s.seq_len - 1 < 4 * s.num_kv_pairs:
            raise ConfigError(f"eval --kv-pairs: {s.num_kv_pairs} pairs need --task-vocab >= {2 * s.num_kv_pairs} "
                              f"and a length >= {4 * s.num_kv_pairs + 1} (got {task_vocab} and {s.seq_len})")
    device = next(iter(model.parameters()), torch.empty(0)).device
    results = []
    total = sum(-(-trials // batch_size) for _ in settings)
    with tqdm(total=total, desc="mqar", unit="batch", disable=not progress) as bar:
        for s in settings:
            rng = rng_for(seed, 2, s.seq_len, s.num_kv_pairs, task_vocab)  # one stream per setting
            tokens, answer_at = mqar_documents(rng, trials, s.seq_len - 1, s.num_kv_pairs, task_vocab, base, pad)
            correct = queries = 0
            for start in range(0, trials, batch_size):
                body = torch.from_numpy(tokens[start:start + batch_size])
                ids = torch.cat([torch.full((body.shape[0], 1), bos, dtype=torch.long), body], dim=1).to(device)
                logits = model(ids, return_logits=True).logits  # [B, T, V]
                # The answer to the key at document position p (input position p + 1) is document token p + 1.
                mask = torch.from_numpy(answer_at[start:start + batch_size]).to(device)
                predicted = logits[:, 1:].argmax(dim=-1)  # prediction for document position p + 1
                targets = torch.cat([body[:, 1:], body[:, :1]], dim=1).to(device)  # last column never an answer
                correct += int((predicted[mask] == targets[mask]).sum())
                queries += int(mask.sum())
                bar.update(1)
            results.append({"seq_len": s.seq_len, "num_kv_pairs": s.num_kv_pairs, "accuracy": correct / queries,
                            "correct": correct, "queries": queries})
    return results
