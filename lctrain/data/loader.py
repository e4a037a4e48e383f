"""The stateful, data-parallel-sharded training loader and the fixed evaluation batches.

Training order (a pure function of seed and epoch): `sampling.epoch_order` picks and shuffles the documents of
epoch e, `packing.PackedStream` cuts them into windows (applying the per-token loss mask a synthetic split
carries), and the epochs are laid end to end into one endless sequence of *global* windows. A step of the data-parallel group consumes the next `dp_size * micro_batch_size`
global windows: rank r takes windows p + r, p + r + dp, ..., p + r + (B - 1) dp, where p is the group's position.
Within an epoch this is the usual "rank r takes windows r, r + dp, r + 2 dp, ..."; an epoch that runs out
mid-step simply continues into the next one.

State is where the group stands, `(epoch, position)`, identical on every rank. Because everything before that
point has been consumed by the group and nothing after it, a state saved with one data-parallel size or
micro-batch size resumes exactly with another: the new group just takes the remaining windows its own way.
A state from different data (sources, tokenizer, seq_len, weights) or a different seed is refused.
"""
from __future__ import annotations

import threading

from lctrain.config import ConfigError
from lctrain.data import sampling
from lctrain.data.packing import PackedStream, collate

STATE_VERSION = 1
_EVAL_ORDER_TAG = 0xE7A1  # eval documents are interleaved in a fixed order, independent of train.seed


class TrainLoader:
    """Endless iterator of training batches for one data-parallel rank (see the module docstring)."""

    def __init__(self, splits, weights, seq_len: int, micro_batch_size: int, seed: int, dp_rank: int,
                 dp_size: int, bos_id: int, eos_id: int, fingerprint: str):
        self.splits = list(splits)
        self.weights = list(weights)
        self.seq_len, self.micro_batch_size = seq_len, micro_batch_size
        self.seed, self.dp_rank, self.dp_size = seed, dp_rank, dp_size
        self.bos_id, self.eos_id = bos_id, eos_id
        self.fingerprint = fingerprint
        self.epoch = 0
        self.position = 0  # next global window of `epoch` not yet consumed by the group
        self._streams: dict[int, PackedStream] = {}
        self._ahead = None  # (epoch, thread, [stream]) while the next epoch's order is built in the background
        self._lengths = [split.lengths() + 2 for split in self.splits]  # + BOS + EOS
        self.stream(0)  # fails early, with a clear message, when the data cannot fill one window

    def _make_stream(self, epoch: int) -> PackedStream:
        sources, docs = sampling.epoch_order(self._lengths, self.weights, self.seed, epoch)
        return PackedStream(self.splits, sources, docs, self.seq_len, self.bos_id, self.eos_id)

    def stream(self, epoch: int) -> PackedStream:
        """The packed documents of `epoch` (built on demand, or ahead by `_prepare_next`; at most two are kept)."""
        if epoch not in self._streams:
            ahead = self._ahead
            if ahead is not None and ahead[0] == epoch:
                ahead[1].join()
                stream = ahead[2][0] if ahead[2] else self._make_stream(epoch)
            else:
                stream = self._make_stream(epoch)
            self._ahead = None if ahead is not None and ahead[0] <= epoch else ahead
            if len(stream) == 0:
                raise ConfigError(f"data.seq_len: {self.seq_len} needs at least {self.seq_len + 1} training tokens "
                                  f"per epoch; epoch {epoch} has {stream.total_tokens}: lower it or add data")
            if len(self._streams) >= 2:  # keep the current and the next epoch (a step may straddle them)
                self._streams.pop(max(self._streams, key=lambda e: abs(e - epoch)))
            self._streams[epoch] = stream
        return self._streams[epoch]

    def _prepare_next(self) -> None:
        """Past half of an epoch, build the next epoch's order in a background thread, so that crossing the
        boundary does not stall the step (with tens of millions of documents that takes seconds)."""
        nxt = self.epoch + 1
        if nxt in self._streams or self._ahead is not None:
            return
        if 2 * self.position < len(self._streams[self.epoch]):
            return
        result: list = []
        thread = threading.Thread(target=lambda: result.append(self._make_stream(nxt)), daemon=True,
                                  name=f"epoch-{nxt}-order")
        self._ahead = (nxt, thread, result)
        thread.start()

    def _locate(self, epoch: int, offset: int) -> tuple[int, int]:
        """Normalise `offset` windows past the start of `epoch` into (epoch, window index in that epoch)."""
        while offset >= len(self.stream(epoch)):
            offset -= len(self.stream(epoch))
            epoch += 1
        return epoch, offset

    def __iter__(self) -> "TrainLoader":
        return self

    def __next__(self) -> dict:
        examples = []
        for j in range(self.micro_batch_size):
            epoch, index = self._locate(self.epoch, self.position + self.dp_rank + j * self.dp_size)
            examples.append(self.stream(epoch).example(index))
        self.epoch, self.position = self._locate(self.epoch, self.position + self.dp_size * self.micro_batch_size)
        self._prepare_next()
        return collate(examples)

    def state_dict(self) -> dict:
        return {"version": STATE_VERSION, "epoch": self.epoch, "position": self.position, "seed": self.seed,
                "dp_size": self.dp_size, "micro_batch_size": self.micro_batch_size, "fingerprint": self.fingerprint}

    def load_state_dict(self, state: dict) -> None:
        check_state_origin(state, "mixed", ("epoch", "position"), self.fingerprint, self.seed)
        self.epoch, self.position = self._locate(int(state["epoch"]), int(state["position"]))


def check_state_origin(state: dict, batching: str, keys: tuple[str, ...], fingerprint: str, seed: int) -> None:
    """Refuse, with a one-line ConfigError, a loader state written for other batching, data or seed, or lacking
    `keys`. A mixed loader's state carries no `batching` entry."""
    theirs = state.get("batching", "mixed")
    if theirs != batching:
        raise ConfigError(f"data.batching: the checkpoint was trained with {theirs} batches, this run asks for "
                          f"{batching}; resume with the same data.batching or start a new run")
    missing = [k for k in (*keys, "seed", "fingerprint") if k not in state]
    if missing:
        raise ConfigError(f"checkpoint.resume: the data loader state lacks {', '.join(missing)}; it was not "
                          "written by this loader")
    if state["fingerprint"] != fingerprint:
        raise ConfigError(f"data.sources: the checkpoint was trained on different data (fingerprint "
                          f"{state['fingerprint']}, now {fingerprint}: sources, tokenizer, seq_len, "
                          "eval_fraction or weights changed); resume with the same data or start a new run")
    if int(state["seed"]) != seed:
        raise ConfigError(f"train.seed: {seed} differs from the checkpoint's {state['seed']}; the data "
                          "order depends on the seed, resume with the same seed")


def eval_stream(splits, seq_len: int, bos_id: int, eos_id: int) -> PackedStream:
    """All held-out documents of all sources, interleaved in a fixed hashed order, as one packed stream."""
    import numpy as np

    sources = np.concatenate([np.full(len(split), s, dtype=np.int64) for s, split in enumerate(splits)])
    docs = np.concatenate([np.arange(len(split), dtype=np.int64) for split in splits])
    order = sampling.keyed_permutation(len(docs), _EVAL_ORDER_TAG)
    return PackedStream(splits, sources[order], docs[order], seq_len, bos_id, eos_id)


def eval_batches(stream: PackedStream, n: int, micro_batch_size: int) -> list[dict]:
    """The first `n` micro-batches of held-out windows (the last may hold fewer rows).

    The list is the same on every data-parallel rank: the caller decides which rank evaluates which batch
    (e.g. batch i on rank i % dp) and sums the losses over the group, so the result does not depend on dp.
    """
    n_windows = min(len(stream), max(n, 0) * micro_batch_size)
    return [collate([stream.example(i) for i in range(start, min(start + micro_batch_size, n_windows))])
            for start in range(0, n_windows, micro_batch_size)]
