"""`data.batching: per_source`: every optimizer step trains on windows of a single source.

The default loader (`loader.TrainLoader`) shuffles the sources together, so every batch is a mixture. Some tasks
learn much faster from homogeneous steps. On MQAR with documents of 2 to 12 pairs, a 4-layer GDN trained on
mixed batches stayed at the chance loss (ln 16) for 800 steps; with one pair count per batch it learned the
lookup within 1000 steps (see bench/recall.py), and `recipes/mqar_hybrid.yaml` gets below loss 0.03 in 425
steps instead of about 900. The easy steps carry a clean gradient that a mixture drowns in the noise of the
hard examples.

Each source gets its own `TrainLoader` over its documents only, with its own seeded order. The source of step k
is chosen by smooth weighted round-robin over `data.sources[*].weight`: every step, each source gains its weight
in credit, and the source with the most credit (the first on a tie) is chosen and pays the total weight. So the
schedule is a pure function of k, the same on every rank; source s gets its share w_s / sum(w) of every long
enough run of steps; equal weights cycle 0, 1, 2, ... A step's `batches_per_step` micro-batches (gradient
accumulation) all come from its source.

The state holds the step count and each source loader's state. Like the mixed loader's state, it resumes exactly
with another data-parallel size or micro-batch size.
"""
from __future__ import annotations

from lctrain.config import ConfigError
from lctrain.data.loader import TrainLoader, check_state_origin
from lctrain.data.sampling import combine_key

STATE_KIND = "per_source"
_SOURCE_SEED_TAG = 0x5043_5352  # a separate document order per source


def next_source(credits: list[float], weights: list[float]) -> int:
    """One step of smooth weighted round-robin: updates `credits` in place, returns the chosen source."""
    for i, w in enumerate(weights):
        credits[i] += w
    s = max(range(len(credits)), key=lambda i: (credits[i], -i))
    credits[s] -= sum(weights)
    return s


def step_schedule(weights: list[float], steps: int) -> list[int]:
    """The source of each of the first `steps` steps."""
    credits = [0.0] * len(weights)
    return [next_source(credits, weights) for _ in range(steps)]


class SourceBatchLoader:
    """Endless iterator of training batches for one data-parallel rank, one source per step."""

    def __init__(self, splits, weights, seq_len: int, micro_batch_size: int, seed: int, dp_rank: int,
                 dp_size: int, bos_id: int, eos_id: int, fingerprint: str, batches_per_step: int = 1):
        self.weights = [float(w) for w in weights]
        self.seed, self.fingerprint = seed, fingerprint
        self.batches_per_step = max(int(batches_per_step), 1)
        self.loaders = []
        for s, split in enumerate(splits):
            try:
                self.loaders.append(TrainLoader([split], [1.0], seq_len, micro_batch_size,
                                                combine_key(_SOURCE_SEED_TAG, seed, s), dp_rank, dp_size, bos_id,
                                                eos_id, f"{fingerprint}/{s}"))
            except ConfigError as err:
                raise ConfigError(f"data.batching=per_source: data.sources[{s}] alone: {err}") from None
        self._credits = [0.0] * len(self.loaders)
        self.step = 0  # steps whose batches have all been taken
        self._taken = 0  # micro-batches of the current step taken so far
        self._source = 0

    def _pick(self) -> int:
        return next_source(self._credits, self.weights)

    def __iter__(self) -> "SourceBatchLoader":
        return self

    def __next__(self) -> dict:
        if self._taken == 0:
            self._source = self._pick()
        batch = next(self.loaders[self._source])
        self._taken += 1
        if self._taken == self.batches_per_step:
            self._taken, self.step = 0, self.step + 1
        return batch

    def state_dict(self) -> dict:
        if self._taken:  # checkpoints are taken between steps; a state inside one could not resume exactly
            raise RuntimeError("SourceBatchLoader.state_dict inside a step (after "
                               f"{self._taken} of {self.batches_per_step} micro-batches)")
        return {"version": 1, "batching": STATE_KIND, "step": self.step, "seed": self.seed,
                "fingerprint": self.fingerprint, "sources": [loader.state_dict() for loader in self.loaders]}

    def load_state_dict(self, state: dict) -> None:
        check_state_origin(state, STATE_KIND, ("step", "sources"), self.fingerprint, self.seed)
        for loader, sub in zip(self.loaders, state["sources"]):
            loader.load_state_dict(sub)
        self.step, self._taken = int(state["step"]), 0
        self._credits = [0.0] * len(self.loaders)
        for _ in range(self.step):  # replay the schedule: the credits are a function of the step count
            self._pick()
