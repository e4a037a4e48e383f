"""`data.streaming: true`: read and tokenise the sources while training, with no cache and no start-up pass.

Order (a pure function of seed, epoch, the shard list and V, the number of *virtual ranks*, fixed by the world
size of the run's first start and kept in its checkpoints): in epoch e each source's shards are taken in a seeded
permutation; virtual rank v reads shards v, v + V, ... of it (with fewer shards than V, every virtual rank reads
every shard and keeps documents v, v + V, ...). A shard's documents are read (text only, bounded by the shard size)
and emitted in a seeded permutation: the shard is the shuffle buffer, so its state is just the cursor. Sources are
interleaved by smooth weighted round-robin on tokens, and documents are packed into windows exactly as
`packing.PackedStream` does ([BOS] doc [EOS], `seq_len + 1` tokens, one shared between neighbours, labels -100
across documents, positions restarting at each document and window start). Global window w is window w // V of
virtual rank w % V, and a step of the group takes windows p + r + j dp as in `loader`; with dp = V rank r reads
virtual rank r alone, exactly the run's own streams.

Documents are tokenised ahead by a background thread feeding `data.num_workers` processes (in order, a bounded
number of batches in flight), so the first batch comes once the first shard is read and its first documents are
tokenised, whatever the corpus size.

State: the global position p, V, and per virtual rank this process reads (epoch, shard cursor, document cursor)
per source, the round-robin credits, the packer's leftover tokens and its window count, all taken at p. Resuming
with the same number of processes restores it exactly. On another number (1 -> 2, 2 -> 1, ...) the order goes on
unchanged: a process reads the virtual ranks of the windows it takes (from every old rank's saved states), and
where several processes share a virtual rank each reads it and skips the windows that are not its own, which
costs reading, never correctness; it is cheapest when the new number divides V. Evaluation data comes from
`data.eval_sources` (cached as usual).
"""
from __future__ import annotations

import queue
import threading
from concurrent.futures import ProcessPoolExecutor

import numpy as np

from lctrain.config import ConfigError
from lctrain.data import readers
from lctrain.data.parallel_build import encode_in_worker
from lctrain.data.packing import IGNORE_INDEX, collate
from lctrain.data.sampling import keyed_permutation

STATE_KIND = "streaming"
_SHARD_TAG = 0x5354_5245  # shard order per epoch
_DOC_TAG = 0x444F_4353  # document order inside a shard
_BATCH_DOCS = 32  # documents per tokenising task
_AHEAD = 256  # tokenised documents kept ready per source


class _SourceStream:
    """Documents of one source for one rank, tokenised ahead by a producer thread."""

    def __init__(self, index: int, shards: list, seed: int, dp_rank: int, dp_size: int, on_bad: str, tokenizer,
                 pool):
        self.index, self.shards, self.seed = index, shards, seed
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.on_bad, self.tokenizer, self.pool = on_bad, tokenizer, pool
        self.cursor = (0, 0, 0)  # (epoch, shard cursor, document cursor) of the next document to hand out
        self._queue = None
        self._stop = None
        self._thread = None

    def my_shards(self, epoch: int) -> tuple[list[int], int, int]:
        """(shard indices this rank reads in `epoch`, document stride, document offset)."""
        order = keyed_permutation(len(self.shards), self.seed, epoch, self.index, _SHARD_TAG).tolist()
        if len(order) >= self.dp_size:
            return order[self.dp_rank::self.dp_size], 1, 0
        return order, self.dp_size, self.dp_rank

    # ---------------------------------------------------------------------------------------- producer
    def start(self) -> None:
        self.stop()
        self._queue = queue.Queue(maxsize=_AHEAD)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, args=(self.cursor,), daemon=True,
                                        name=f"stream-source-{self.index}")
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._stop.set()
            while self._thread.is_alive():
                try:
                    self._queue.get_nowait()
                except queue.Empty:
                    self._thread.join(0.05)
            self._thread = None

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self, cursor) -> None:
        try:
            epoch, k, j = cursor
            empty_epochs = 0
            while not self._stop.is_set():
                shards, stride, offset = self.my_shards(epoch)
                produced = False
                while k < len(shards) and not self._stop.is_set():
                    shard_index = shards[k]
                    texts = list(self.shards[shard_index].read(self.on_bad, readers.ReadStats()))
                    order = keyed_permutation(len(texts), self.seed, epoch, self.index, shard_index, _DOC_TAG)
                    order = order[offset::stride]
                    pending = []  # (cursor after, future or tokens)
                    for start in range(j, len(order), _BATCH_DOCS):
                        batch = [texts[i] for i in order[start:start + _BATCH_DOCS]]
                        pending.append((start, len(batch), self._submit(batch)))
                        if len(pending) >= 4:  # a few batches in flight keep the workers busy
                            if not self._deliver(pending.pop(0), epoch, k, len(order)):
                                return
                    for item in pending:
                        if not self._deliver(item, epoch, k, len(order)):
                            return
                    produced = produced or len(order) > j
                    k, j = k + 1, 0
                empty_epochs = 0 if produced else empty_epochs + 1
                if empty_epochs >= 2:
                    raise ConfigError(f"data.sources[{self.index}]: holds no documents for data-parallel rank "
                                      f"{self.dp_rank} of {self.dp_size}; add data")
                epoch, k, j = epoch + 1, 0, 0
        except BaseException as exc:  # handed to the consumer, which raises it in the training process
            self._put(("error", exc))

    def _submit(self, batch: list[str]):
        if self.pool is None:
            return [np.asarray(ids, dtype=np.int32) for ids in self.tokenizer.encode_batch(batch)]
        return self.pool.submit(encode_in_worker, self.tokenizer.model_proto, batch)

    def _deliver(self, item, epoch: int, k: int, n_docs: int) -> bool:
        start, count, result = item
        tokens = result if isinstance(result, list) else result.result()
        for i, ids in enumerate(tokens):
            after = (epoch, k, start + i + 1) if start + i + 1 < n_docs else (epoch, k + 1, 0)
            if not self._put(("doc", after, ids)):
                return False
        return True

    # ---------------------------------------------------------------------------------------- consumer
    def next_document(self) -> np.ndarray:
        kind, *payload = self._queue.get()
        if kind == "error":
            raise payload[0]
        self.cursor, ids = payload
        return ids


class _VirtualRank:
    """The documents and windows of virtual rank v of V: what rank v of the run that fixed V reads and packs."""

    def __init__(self, sources: list, tokenizer, seq_len: int, seed: int, v: int, n_virtual: int, on_bad: str,
                 pool):
        self.seq_len, self.bos_id, self.eos_id = seq_len, tokenizer.bos_id, tokenizer.eos_id
        self.weights = [float(s.weight) for s in sources]
        self.streams = [_SourceStream(i, s.planned_shards(), seed, v, n_virtual, on_bad, tokenizer, pool)
                        for i, s in enumerate(sources)]
        self.credits = [0.0] * len(sources)
        self._tokens = np.zeros(0, dtype=np.int64)  # packer leftover: the next window starts at its first token
        self._segments = np.zeros(0, dtype=np.int64)  # document number of each leftover token
        self._next_segment = 0
        self.windows = 0  # windows produced so far
        self._started = False

    def start(self) -> None:
        for stream in self.streams:
            stream.start()
        self._started = True

    def stop(self) -> None:
        for stream in self.streams:
            stream.stop()

    def _pick(self) -> int:
        return max(range(len(self.credits)), key=lambda i: (self.credits[i], -i))

    def _add_document(self) -> None:
        s = self._pick()
        ids = self.streams[s].next_document()
        framed = np.concatenate([[self.bos_id], ids.astype(np.int64), [self.eos_id]])
        total = sum(self.weights)
        for i, w in enumerate(self.weights):  # smooth weighted round-robin on tokens
            self.credits[i] += w / total * len(framed)
        self.credits[s] -= len(framed)
        self._tokens = np.concatenate([self._tokens, framed])
        self._segments = np.concatenate([self._segments, np.full(len(framed), self._next_segment, dtype=np.int64)])
        self._next_segment += 1

    def _window(self) -> dict:
        if not self._started:
            self.start()
        need = self.seq_len + 1
        while len(self._tokens) < need:
            self._add_document()
        tokens, segments = self._tokens[:need], self._segments[:need]
        change = np.flatnonzero(segments[1:] != segments[:-1]) + 1
        piece_start = np.zeros(need, dtype=np.int64)
        piece_start[change] = change
        positions = np.arange(need) - np.maximum.accumulate(piece_start)
        labels = tokens[1:].copy()
        labels[segments[1:] != segments[:-1]] = IGNORE_INDEX
        self._tokens, self._segments = self._tokens[self.seq_len:], self._segments[self.seq_len:]
        self.windows += 1
        return {"input_ids": tokens[:-1].copy(), "labels": labels, "position_ids": positions[:-1]}

    def window(self, index: int) -> dict:
        """Window `index` of this virtual rank (the ones before it, not taken by this process, are skipped)."""
        if index < self.windows:
            raise RuntimeError(f"streaming: window {index} of a virtual rank already passed ({self.windows})")
        while self.windows < index:
            self._window()
        return self._window()

    def state(self) -> dict:
        return {"windows": self.windows, "credits": list(self.credits),
                "cursors": [list(s.cursor) for s in self.streams],
                "leftover": self._tokens.tolist(), "leftover_segments": self._segments.tolist()}

    def load(self, state: dict) -> None:
        for stream, cursor in zip(self.streams, state["cursors"]):
            stream.cursor = tuple(int(c) for c in cursor)
        self.credits = [float(c) for c in state["credits"]]
        self._tokens = np.asarray(state["leftover"], dtype=np.int64)
        segments = np.asarray(state["leftover_segments"], dtype=np.int64)
        self._segments = segments - (segments[0] if len(segments) else 0)
        self._next_segment = int(self._segments[-1]) + 1 if len(self._segments) else 0
        self.windows = int(state.get("windows", 0))
        if self._started:
            self.start()


class StreamingLoader:
    """Endless iterator of training batches for one data-parallel rank, read and tokenised on the fly."""

    def __init__(self, sources: list, tokenizer, seq_len: int, micro_batch_size: int, seed: int, dp_rank: int,
                 dp_size: int, on_bad: str, workers: int, fingerprint: str):
        import multiprocessing

        self.sources, self.tokenizer, self.on_bad = sources, tokenizer, on_bad
        self.seq_len, self.micro_batch_size = seq_len, micro_batch_size
        self.seed, self.dp_rank, self.dp_size, self.fingerprint = seed, dp_rank, dp_size, fingerprint
        self._pool = (ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
                      if workers > 1 else None)
        self.n_virtual = dp_size  # a fresh run fixes V = its data-parallel size; a resumed one keeps the saved V
        self.position = 0  # next global window not yet consumed by the group
        self._virtual: dict[int, _VirtualRank] = {}
        self._saved: dict[int, dict] = {}  # states of virtual ranks from the checkpoint, not opened yet

    def virtual(self, v: int) -> _VirtualRank:
        if v not in self._virtual:
            lane = _VirtualRank(self.sources, self.tokenizer, self.seq_len, self.seed, v, self.n_virtual,
                                self.on_bad, self._pool)
            if v in self._saved:
                lane.load(self._saved.pop(v))
            self._virtual[v] = lane
        return self._virtual[v]

    def close(self) -> None:
        for lane in self._virtual.values():
            lane.stop()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    def __iter__(self) -> "StreamingLoader":
        return self

    def example(self, index: int) -> dict:
        """Global window `index`: window index // V of virtual rank index % V."""
        return self.virtual(index % self.n_virtual).window(index // self.n_virtual)

    def __next__(self) -> dict:
        examples = [self.example(self.position + self.dp_rank + j * self.dp_size)
                    for j in range(self.micro_batch_size)]
        self.position += self.dp_size * self.micro_batch_size
        return collate(examples)

    def state_dict(self) -> dict:
        """The global position and the state, at that position, of every virtual rank this process holds (a
        virtual rank shared with other processes is first brought up to the position: the windows it skips
        belong to them)."""
        lanes = {}
        for v, lane in sorted(self._virtual.items()):
            due = max(0, -(-(self.position - v) // self.n_virtual))  # its windows before the position
            while lane.windows < due:
                lane._window()
            lanes[str(v)] = lane.state()
        lanes.update({str(v): st for v, st in self._saved.items()})
        return {"version": 2, "batching": STATE_KIND, "seed": self.seed, "fingerprint": self.fingerprint,
                "dp_rank": self.dp_rank, "dp_size": self.dp_size, "position": self.position,
                "virtual_ranks": self.n_virtual, "lanes": lanes}

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state`; `state["all_ranks"]` (the states every rank saved, added when the world size
        changed) supplies the virtual ranks this process did not save itself."""
        from lctrain.data.loader import check_state_origin

        check_state_origin(state, STATE_KIND, ("cursors",) if int(state.get("version", 1)) == 1 else
                           ("position", "virtual_ranks", "lanes"), self.fingerprint, self.seed)
        if int(state.get("version", 1)) == 1:  # per-rank streams: rank r was virtual rank r of dp_size
            if (int(state["dp_size"]), int(state["dp_rank"])) != (self.dp_size, self.dp_rank):
                raise ConfigError(f"data.streaming: the checkpoint's streams (state version 1) belong to "
                                  f"{state['dp_size']} data-parallel ranks, this run has {self.dp_size}; resume "
                                  f"streaming with {state['dp_size']} process"
                                  f"{'es' if int(state['dp_size']) != 1 else ''}, or set "
                                  "checkpoint.reset_data=true to keep the weights and start the streams again")
            state = {"position": 0, "virtual_ranks": self.dp_size,
                     "lanes": {str(self.dp_rank): dict(state, windows=0)}}
        merged: dict[int, dict] = {}
        for part in [state, *state.get("all_ranks", [])]:
            for v, lane in part.get("lanes", {}).items():
                if int(v) not in merged or int(lane["windows"]) > int(merged[int(v)]["windows"]):
                    merged[int(v)] = lane
        for lane in self._virtual.values():
            lane.stop()
        self._virtual, self._saved = {}, merged
        self.n_virtual, self.position = int(state["virtual_ranks"]), int(state["position"])
        needed = {(self.position + self.dp_rank + j * self.dp_size) % self.n_virtual
                  for j in range(self.micro_batch_size)}
        missing = sorted(v for v in needed if v not in merged and self.position > v)  # unsaved and not new
        if missing:
            raise ConfigError(f"data.streaming: the checkpoint holds no state for virtual rank {missing[0]} of "
                              f"{self.n_virtual}; resume from a checkpoint with every rank's file")
