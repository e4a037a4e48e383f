"""Cache entries appear complete or not at all, and are built once under concurrency."""
import threading
import time

import pytest

from lctrain.data.cache import build_once


def test_concurrent_builders_build_once(tmp_path):
    calls = []

    def build(directory):
        calls.append(directory)
        time.sleep(0.2)  # hold the lock long enough for the other thread to queue on it
        (directory / "payload.txt").write_text("done")

    results = []
    threads = [threading.Thread(target=lambda: results.append(build_once(tmp_path, "key", build)))
               for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1
    assert len(set(results)) == 1 and (results[0] / "payload.txt").read_text() == "done"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["key", "key.lock"]


def test_a_failed_build_leaves_nothing_and_is_retried(tmp_path):
    def crash(directory):
        (directory / "half.bin").write_bytes(b"\0" * 10)
        raise KeyboardInterrupt  # like a run killed mid-build

    with pytest.raises(KeyboardInterrupt):
        build_once(tmp_path, "key", crash)
    assert not (tmp_path / "key").exists() and not list(tmp_path.glob("key.tmp-*"))
    (tmp_path / "key.tmp-123-dead").mkdir()  # debris of a process killed with SIGKILL
    entry = build_once(tmp_path, "key", lambda d: (d / "ok").write_text("1"))
    assert (entry / "ok").read_text() == "1" and not list(tmp_path.glob("key.tmp-*"))
