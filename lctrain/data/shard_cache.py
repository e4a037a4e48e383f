"""The token cache of one shard: build it once, atomically, and open it memory-mapped.

Entry `<cache_dir>/shards/<key>/`, key = hash(format, shard content, reader settings, tokenizer content):
    tokens.bin     flat tokens of the shard's documents, uint16 (vocab <= 65536) or uint32, no BOS/EOS
    offsets.npy    int64 [n_docs + 1]; document i is tokens[offsets[i]:offsets[i + 1]]
    doc_hash.npy   uint64 [n_docs]: hash of each document's text (the held-out split is a function of it)
    meta.json      counts, dtype, and the bad records skipped (count and first examples)

An entry is written under `<key>.tmp-<host>-<pid>-<random>` and renamed into place. The builder holds an `flock` on
`<key>.lock`, so on one machine a shard is built once; where locks do not reach (some network file systems) two
nodes may build the same shard, and the second rename simply finds the entry there. A temporary directory is
removed only when it is provably dead: its process is gone on this host, or (another host's) it has not been
written to for `STALE_SECONDS`. Nothing else is ever deleted behind a running build.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
import socket
import time
import uuid
from array import array
from pathlib import Path

import numpy as np

from lctrain.data import readers

FORMAT_VERSION = 1
STALE_SECONDS = 6 * 3600
ENCODE_BATCH_DOCS = 256
ENCODE_BATCH_CHARS = 1 << 22
LONG_DOC_CHARS = 1 << 20  # longer documents are encoded piece by piece (bounded memory)


def entry_key(shard, tokenizer_fingerprint: str) -> str:
    blob = json.dumps({"version": FORMAT_VERSION, "content": shard.content, "reader": shard.reader_params(),
                       "tokenizer": tokenizer_fingerprint}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def doc_hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


# ----------------------------------------------------------------------------------------------- building
def build_entry(root: Path, key: str, shard, tokenizer, on_bad: str, blocking: bool) -> tuple[str, dict]:
    """Make sure `<root>/<key>` exists. Returns ("exists" | "built" | "busy", stats); "busy" (only when not
    `blocking`) means another process holds the shard's lock and is building it."""
    root = Path(root)
    final = root / key
    if final.is_dir():
        return "exists", {}
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f"{key}.lock", "a") as lock:
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                return "busy", {}
            raise
        try:
            if final.is_dir():
                return "exists", {}
            clean_stale(root, key)
            tmp = root / f"{key}.tmp-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            tmp.mkdir()
            try:
                t0, cpu0 = time.perf_counter(), time.process_time()
                meta = tokenize_shard(shard, tokenizer, on_bad, tmp)
                meta["seconds"] = time.perf_counter() - t0
                meta["cpu_seconds"] = time.process_time() - cpu0  # on a busy machine, wall time says little
                meta["peak_rss_mib"] = peak_rss_mib()
                (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
                for path in tmp.iterdir():
                    with open(path, "rb") as handle:
                        os.fsync(handle.fileno())
                try:
                    os.rename(tmp, final)
                except OSError:
                    if not final.is_dir():
                        raise
                    shutil.rmtree(tmp, ignore_errors=True)  # another node finished the same shard first
                    return "exists", {}
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            return "built", meta
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def clean_stale(root: Path, key: str) -> list[Path]:
    """Remove `<key>.tmp-*` directories whose builder is dead (see the module docstring); returns them."""
    removed = []
    host = socket.gethostname()
    for tmp in root.glob(f"{key}.tmp-*"):
        owner = tmp.name[len(key) + 5:]
        owner_host, _, rest = owner.rpartition("-")[0].rpartition("-")
        pid = rest
        if owner_host == host:
            dead = not pid.isdigit() or not _alive(int(pid))
        else:
            newest = max([p.stat().st_mtime for p in tmp.iterdir()] + [tmp.stat().st_mtime], default=0.0)
            dead = time.time() - newest > STALE_SECONDS
        if dead:
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp)
    return removed


def peak_rss_mib() -> float:
    """This process's peak resident memory (VmHWM: unlike ru_maxrss it does not count the parent's pages that a
    freshly spawned worker held between fork and exec)."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def tokenize_shard(shard, tokenizer, on_bad: str, directory: Path) -> dict:
    """Write the shard's entry files into `directory`; returns its meta (without `seconds`)."""
    dtype = token_dtype(tokenizer.vocab_size)
    stats = readers.ReadStats()
    lengths, hashes = array("q"), array("Q")
    batch: list[str] = []
    chars = 0
    with open(directory / "tokens.bin", "wb") as out:
        def flush():
            nonlocal batch, chars
            if batch:
                # one thread per builder: the builders (`data.num_workers` per rank) already share out the
                # cores, and sentencepiece's own pool in each would put workers x cores threads on them
                for ids in tokenizer.encode_batch(batch, threads=1):
                    np.asarray(ids, dtype=dtype).tofile(out)
                    lengths.append(len(ids))
                batch, chars = [], 0

        for text in shard.read(on_bad, stats):
            hashes.append(doc_hash(text))
            if len(text) > LONG_DOC_CHARS:
                flush()
                lengths.append(_encode_long(text, tokenizer, dtype, out))
                continue
            batch.append(text)
            chars += len(text)
            if len(batch) >= ENCODE_BATCH_DOCS or chars >= ENCODE_BATCH_CHARS:
                flush()
        flush()
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(np.frombuffer(lengths, dtype=np.int64) if len(lengths) else [], out=offsets[1:])
    np.save(directory / "offsets.npy", offsets)
    np.save(directory / "doc_hash.npy", np.frombuffer(hashes, dtype=np.uint64) if len(hashes)
            else np.zeros(0, dtype=np.uint64))
    return {"version": FORMAT_VERSION, "dtype": dtype.name, "source": shard.source, "shard": shard.label,
            "bytes": shard.size, "docs": len(lengths), "tokens": int(offsets[-1]), "empty": stats.empty,
            "skipped": stats.skipped, "bad_examples": stats.examples}


def _encode_long(text: str, tokenizer, dtype, out) -> int:
    """Encode a very long document in pieces cut after a newline (or a space), writing as it goes."""
    total, start = 0, 0
    while start < len(text):
        end = min(len(text), start + LONG_DOC_CHARS)
        if end < len(text):
            cut = text.rfind("\n", start + LONG_DOC_CHARS // 2, end)
            if cut < 0:
                cut = text.rfind(" ", start + LONG_DOC_CHARS // 2, end)
            end = cut + 1 if cut >= 0 else end
        ids = np.asarray(tokenizer.encode(text[start:end]), dtype=dtype)
        ids.tofile(out)
        total += len(ids)
        start = end
    return total


# ----------------------------------------------------------------------------------------------- reading
class ShardEntry:
    """An opened entry: tokens memory-mapped, offsets and hashes memory-mapped too (shared page cache)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.meta = json.loads((self.path / "meta.json").read_text())
        self.offsets = np.load(self.path / "offsets.npy", mmap_mode="r")
        self.doc_hash = np.load(self.path / "doc_hash.npy", mmap_mode="r")
        count = int(self.offsets[-1])
        dtype = np.dtype(self.meta["dtype"])
        self.tokens = (np.memmap(self.path / "tokens.bin", dtype=dtype, mode="r", shape=(count,)) if count
                       else np.zeros(0, dtype=dtype))

    def __len__(self) -> int:
        return len(self.offsets) - 1
