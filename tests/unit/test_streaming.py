"""The streaming machinery of convert: background writes, read-ahead with the digest, skipping tensors unread, direct
I/O."""

import errno
import hashlib
import os
import threading

import pytest
import torch
from safetensors.torch import save_file

import bitcpm_cli.core.io.direct as direct
import bitcpm_cli.core.model.checkpoint as checkpoint
from bitcpm_cli.core.io.background import BackgroundIO, prefetched
from bitcpm_cli.core.io.direct import DirectFile, DirectReader
from bitcpm_cli.core.model.checkpoint import iter_safetensors
from tests.helpers import refuse_direct_io_at_open


def test_background_io_runs_calls_in_order(tmp_path):
    done, digest = [], hashlib.sha256()
    chunks = [bytes([i]) * 1000 for i in range(50)]
    with BackgroundIO(max_pending_bytes=3000) as io:
        for i, chunk in enumerate(chunks):
            io.submit(digest.update, chunk, nbytes=len(chunk))
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


# ---- direct I/O ---------------------------------------------------------------------------------------------------
MiB = 2**20
LINUX_DIRECT_IO = pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="O_DIRECT is Linux's")
SIZES = [0, 1, 4095, 4096, 4097, 8 * MiB - 1, 8 * MiB, 8 * MiB + 4097, 20 * MiB + 3]  # around blocks and the buffer


def _payload(size: int) -> bytes:
    generator = torch.Generator().manual_seed(size)
    return torch.randint(0, 256, (size,), dtype=torch.uint8, generator=generator).numpy().tobytes()


def _write(path, data: bytes, pieces: int = 7) -> DirectFile:
    with DirectFile(path) as handle:
        step = max(1, len(data) // pieces + 13)  # writes that straddle blocks and the buffer
        for start in range(0, len(data), step):
            handle.write(data[start:start + step])
    return handle


@pytest.mark.parametrize("size", SIZES)
def test_direct_file_writes_exactly_the_bytes_given(tmp_path, size):
    data = _payload(size)
    _write(tmp_path / "out", data)
    assert (tmp_path / "out").read_bytes() == data


@pytest.mark.parametrize("size", SIZES)
def test_direct_reader_reads_what_was_written_from_any_position(tmp_path, size):
    data = _payload(size)
    _write(tmp_path / "out", data)
    with DirectReader(tmp_path / "out") as reader:
        assert reader.read(size + 10) == data  # past the end: what there is
        for position, length in [(0, 1), (size // 3, 5000), (max(size - 7, 0), 100), (4095, 8 * MiB + 2)]:
            reader.seek(position)
            assert reader.read(length) == data[position:position + length]
        out = bytearray(size)
        reader.seek(0)
        assert reader.readinto(out) == size and out == data


def _direct_here(path) -> bool:
    with DirectFile(path) as handle:
        return handle.direct


@LINUX_DIRECT_IO
def test_direct_io_is_used_where_the_filesystem_takes_it(tmp_path):
    import fcntl

    if not _direct_here(tmp_path / "probe"):
        pytest.skip("this filesystem refuses O_DIRECT")
    data = _payload(8 * MiB + 4097)
    with DirectFile(tmp_path / "out") as handle:
        assert fcntl.fcntl(handle._fd, fcntl.F_GETFL) & os.O_DIRECT
        handle.write(data)
    assert (tmp_path / "out").read_bytes() == data
    with DirectReader(tmp_path / "out") as reader:
        assert reader.direct and fcntl.fcntl(reader._fd, fcntl.F_GETFL) & os.O_DIRECT
        assert reader.read(len(data)) == data


@LINUX_DIRECT_IO
def test_a_filesystem_refusing_direct_io_at_open_gets_the_same_bytes(tmp_path, monkeypatch):
    refuse_direct_io_at_open(monkeypatch)
    data = _payload(8 * MiB + 4097)
    with DirectFile(tmp_path / "out") as handle:
        assert not handle.direct  # refused at open: through the page cache from the start
        handle.write(data)
    assert (tmp_path / "out").read_bytes() == data
    with DirectReader(tmp_path / "out") as reader:
        assert not reader.direct and reader.read(len(data)) == data


@LINUX_DIRECT_IO
def test_a_filesystem_refusing_the_direct_transfer_itself_gets_the_same_bytes(tmp_path, monkeypatch):
    import fcntl

    if not _direct_here(tmp_path / "probe"):
        pytest.skip("this filesystem refuses O_DIRECT")
    real_write, real_preadv = os.write, os.preadv

    def refuse_direct(call):
        def transfer(fd, *args):
            if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
                raise OSError(errno.EINVAL, "Invalid argument")
            return call(fd, *args)
        return transfer

    monkeypatch.setattr(os, "write", refuse_direct(real_write))
    monkeypatch.setattr(os, "preadv", refuse_direct(real_preadv))
    data = _payload(20 * MiB + 3)
    with DirectFile(tmp_path / "out") as handle:
        assert handle.direct  # opened for direct I/O ...
        handle.write(data)
        assert not handle.direct  # ... and switched to the page cache at the first refused write
    assert (tmp_path / "out").read_bytes() == data
    with DirectReader(tmp_path / "out") as reader:
        assert reader.direct
        assert reader.read(len(data)) == data and not reader.direct


def test_short_reads_are_continued_not_taken_for_the_end(tmp_path, monkeypatch):
    data = _payload(8 * MiB + 4097)
    _write(tmp_path / "out", data)
    real_preadv = os.preadv

    def short(fd, buffers, offset):
        return real_preadv(fd, [buffers[0][:8192]], offset)  # two blocks at a time, whatever was asked

    monkeypatch.setattr(os, "preadv", short)
    with DirectReader(tmp_path / "out") as reader:
        reader.seek(1000)
        assert reader.read(5 * MiB) == data[1000:1000 + 5 * MiB]
        reader.seek(0)
        assert reader.read(len(data)) == data


def test_a_failed_write_is_raised_once_not_retried_and_the_file_never_closes_as_complete(tmp_path, monkeypatch):
    calls = []

    def full(fd, data):
        calls.append(len(data))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", full)
    handle = DirectFile(tmp_path / "out")
    with pytest.raises(OSError, match="No space left"):
        handle.write(_payload(9 * MiB))
    assert len(calls) == 1
    with pytest.raises(OSError, match="earlier write failed"):
        handle.close()  # never quietly "complete"
    assert len(calls) == 1 and handle._fd is None


def test_leaving_with_an_error_closes_without_writing_the_buffer(tmp_path):
    with pytest.raises(RuntimeError):
        with DirectFile(tmp_path / "out") as handle:
            handle.write(b"x" * 5000)
            raise RuntimeError("stop")
    assert handle._fd is None and (tmp_path / "out").read_bytes() == b""


def _shards(tmp_path):
    tensors = {f"t{i}": torch.randn(i * 1000 + 3, generator=torch.Generator().manual_seed(i)) for i in range(1, 6)}
    tensors["i"] = torch.arange(7, dtype=torch.int64)
    save_file(tensors, tmp_path / "model.safetensors")
    return tensors, tmp_path / "model.safetensors"


def test_a_file_being_written_is_read_back_exactly_below_its_durable_offset(tmp_path, monkeypatch):
    """What --verify does while converting: read a tensor once its writer's `durable` has passed its end. The
    reader never reads a block the writer may still be writing, nor keeps one in its window."""
    monkeypatch.setattr(direct._Direct, "WINDOW", 64 * 1024)  # many windows in a small file
    data = _payload(1_000_003)
    real_preadv, reads = os.preadv, []

    def preadv(fd, buffers, offset):
        reads.append((offset, offset + len(buffers[0])))
        return real_preadv(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", preadv)
    tensors = [(start, min(start + 37_777, len(data))) for start in range(0, len(data), 37_777)]  # unaligned
    checked = 0
    with DirectFile(tmp_path / "out") as writer, DirectReader(tmp_path / "out") as reader:
        for start in range(0, len(data), 10_007):
            writer.write(data[start:start + 10_007])
            durable = writer.durable
            assert durable % 4096 == 0 and durable <= start + 10_007
            while checked < len(tensors) and tensors[checked][1] <= durable:
                begin, end = tensors[checked]
                reader.seek(begin)
                assert reader.read(end - begin) == data[begin:end]
                assert all(stop <= durable for _, stop in reads)  # nothing read past what is on the disk
                checked += 1
    assert 0 < checked < len(tensors)  # the last ones only reach the disk when the file closes


def test_tensors_are_read_and_hashed_in_slices_with_the_same_digest(tmp_path, monkeypatch):
    tensors, path = _shards(tmp_path)
    monkeypatch.setattr(checkpoint, "READ_SLICE", 7)  # many slices, none aligned to an element
    digest = hashlib.sha256()
    read = dict(iter_safetensors(path, digest))
    assert digest.hexdigest() == hashlib.sha256(path.read_bytes()).hexdigest()
    assert all(torch.equal(read[name], tensors[name]) for name in tensors)


@pytest.mark.parametrize("size", SIZES)
def test_flushing_puts_the_whole_blocks_on_the_disk_and_keeps_the_bytes(tmp_path, size):
    data = _payload(size)
    with DirectFile(tmp_path / "out") as handle:
        step = max(1, size // 5 + 7)
        for start in range(0, size, step):
            handle.write(data[start:start + step])
            handle.flush()
            end = min(start + step, size)
            assert handle.durable == end - end % 4096  # every whole block written so far, none partial
    assert (tmp_path / "out").read_bytes() == data
