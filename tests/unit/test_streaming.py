"""The streaming machinery of convert: background writes and digests, read-ahead, skipping tensors unread."""

import hashlib
import threading

import pytest
import torch
from safetensors.torch import save_file

from bitcpm_cli.core.checkpoint import BackgroundIO, find_weight_files, iter_tensors, prefetched


def test_background_io_runs_calls_in_order_and_the_digest_matches(tmp_path):
    done, digest = [], hashlib.sha256()
    chunks = [bytes([i]) * 1000 for i in range(50)]
    with BackgroundIO(max_pending_bytes=3000) as io:
        hasher = io.hasher(digest)
        for i, chunk in enumerate(chunks):
            hasher.update(chunk)
            io.submit(done.append, i, nbytes=10**6)  # over the limit: waits for what came before
    assert done == list(range(50))
    assert digest.hexdigest() == hashlib.sha256(b"".join(chunks)).hexdigest()


def test_background_io_raises_a_failure_in_the_caller_and_runs_nothing_after_it():
    ran = []

    def fail():
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        with BackgroundIO() as io:
            io.submit(fail)
            for i in range(100):
                io.submit(ran.append, i)
    assert not any(t.name.startswith("bitcpm-io") for t in threading.enumerate())
    assert ran == []  # queued behind the failure: skipped


def test_prefetched_keeps_the_order_and_raises_where_the_reader_failed():
    def items():
        for i in range(5):
            yield f"t{i}", torch.full((1000,), i)
        raise ValueError("truncated")

    seen = []
    with pytest.raises(ValueError, match="truncated"):
        for name, tensor in prefetched(items(), max_bytes=0):
            seen.append((name, int(tensor[0])))
    assert seen == [(f"t{i}", i) for i in range(5)]


def test_prefetched_stops_its_reader_when_the_caller_stops():
    produced = []

    def items():
        for i in range(1000):
            produced.append(i)
            yield str(i), torch.zeros(10)

    stream = prefetched(items(), max_bytes=100)
    assert next(stream)[0] == "0"
    stream.close()
    assert len(produced) < 1000
    assert not any(t.name == "bitcpm-read" for t in threading.enumerate())


def test_skipped_tensors_are_not_read(tmp_path, monkeypatch):
    tensors = {"a": torch.arange(6.0), "big": torch.ones(1000), "c": torch.arange(3)}
    save_file(tensors, tmp_path / "model.safetensors")
    files = find_weight_files(tmp_path)
    got = dict(iter_tensors(files, skip=frozenset({"big"})))
    assert set(got) == {"a", "c"} and torch.equal(got["a"], tensors["a"]) and torch.equal(got["c"], tensors["c"])
    with pytest.raises(ValueError, match="every tensor"):
        list(iter_tensors(files, hashlib.sha256(), skip=frozenset({"big"})))
