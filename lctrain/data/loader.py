"""The stateful, data-parallel-sharded training loader and the fixed evaluation batches.

Training order (a pure function of seed and global window index): `lanes.LaneOrder` lays the documents of every
epoch into L independent packed lanes and numbers the windows globally (window w is window w // L of lane w % L;
see `lanes` for the mixture and why lanes). A step of the data-parallel group consumes the next
`dp_size * micro_batch_size` global windows [p, p + dp B), p the group's position; each rank takes B of them, those
of its own lanes (`lanes.rank_windows`: p + r, p + r + dp, ... when dp divides L). So a rank touches about L / dp
lanes, and its order arrays are its share of the corpus, not the whole of it.

State is where the group stands, the global `position`, identical on every rank (`epoch` beside it is about:
each lane ends its epoch on its own). Because everything before that point has been consumed by the group and
nothing after it, a state saved with one data-parallel size or micro-batch size resumes exactly with another:
the new group just takes the remaining windows its own way. A state from different data (sources, tokenizer,
seq_len, weights), a different seed, or the earlier per-epoch order (state version 1) is refused.
"""
from __future__ import annotations

from lctrain.config import ConfigError
from lctrain.data import sampling
from lctrain.data.lanes import LaneOrder, rank_windows
from lctrain.data.packing import PackedStream, collate, example_from

STATE_VERSION = 2
_EVAL_ORDER_TAG = 0xE7A1  # eval documents are interleaved in a fixed order, independent of train.seed


class TrainLoader:
    """Endless iterator of training batches for one data-parallel rank (see the module docstring)."""

    def __init__(self, splits, weights, seq_len: int, micro_batch_size: int, seed: int, dp_rank: int,
                 dp_size: int, bos_id: int, eos_id: int, fingerprint: str):
        self.weights = list(weights)
        self.seq_len, self.micro_batch_size = seq_len, micro_batch_size
        self.seed, self.dp_rank, self.dp_size = seed, dp_rank, dp_size
        self.fingerprint = fingerprint
        self.order = LaneOrder(list(splits), self.weights, seed, seq_len, bos_id, eos_id)
        self.position = 0  # next global window not yet consumed by the group

    @property
    def epoch(self) -> int:
        """About which epoch the group is in (each lane crosses its boundary on its own)."""
        return self.position // max(self.order.windows_per_epoch, 1)

    def example(self, index: int) -> dict:
        """Global window `index` as model inputs (see `packing.example_from`)."""
        return example_from(*self.order.window(index))

    def step_windows(self):
        """The global windows this rank reads in the group's next step."""
        return rank_windows(self.order.lanes, self.position, self.dp_size, self.micro_batch_size, self.dp_rank)

    def __iter__(self) -> "TrainLoader":
        return self

    def __next__(self) -> dict:
        examples = [self.example(int(w)) for w in self.step_windows()]
        self.position += self.dp_size * self.micro_batch_size
        return collate(examples)

    def state_dict(self) -> dict:
        return {"version": STATE_VERSION, "epoch": self.epoch, "position": self.position, "seed": self.seed,
                "dp_size": self.dp_size, "micro_batch_size": self.micro_batch_size, "fingerprint": self.fingerprint,
                "lanes": self.order.lanes}

    def load_state_dict(self, state: dict) -> None:
        check_state_origin(state, "mixed", ("epoch", "position"), self.fingerprint, self.seed)
        if int(state.get("version", 1)) != STATE_VERSION:
            raise ConfigError(f"checkpoint.resume: the data loader state is version {state.get('version', 1)} "
                              f"(an earlier data order), this loader orders data by lanes (version {STATE_VERSION})"
                              "; resume with checkpoint.reset_data=true to start the data again")
        if int(state.get("lanes", self.order.lanes)) != self.order.lanes:
            raise ConfigError(f"checkpoint.resume: the data loader state orders data in {state['lanes']} lanes, "
                              f"this loader in {self.order.lanes} (an earlier data order); resume with "
                              "checkpoint.reset_data=true to start the data again")
        self.position = int(state["position"])


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
