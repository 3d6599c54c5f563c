"""`convert --verify`, alongside the conversion: each input tensor, once all it became is on the disk, is checked on a
thread of its own against the output read back from the disk (direct I/O, a slice at a time); at the end the
written headers, metadata and index are read back and compared with the plan.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from bitcpm_cli.core.conversion.plan import ConversionPlan, ProgressFn
from bitcpm_cli.core.conversion.report import VerifyReport
from bitcpm_cli.core.conversion.write import ShardedWriter
from bitcpm_cli.core.errors import CheckFailed
from bitcpm_cli.core.formats.packed import PACKED_SUFFIX, SCALE_SUFFIX, PackedPairs
from bitcpm_cli.core.io.background import BackgroundIO, prefetched
from bitcpm_cli.core.io.direct import open_direct
from bitcpm_cli.core.io.safetensors import safetensors_metadata, tensor_byte_ranges
from bitcpm_cli.core.model.checkpoint import iter_tensors, read_json, read_tensor_specs
from bitcpm_cli.core.quant import (
    FUSED_GROUP_CANDIDATES,
    LayerQuant,
    fake_quantize,
    fused_scales,
    pack_ternary,
    quantize,
    ternary_codes_from_fused,
)


def _identical(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bytes (so -0.0 differs from +0.0, and a NaN equals itself)."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(_bits(a), _bits(b))


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    """The bytes of a tensor as integers of its own width (comparing int16 is twice as fast as comparing bytes)."""
    flat = tensor.contiguous().reshape(-1)
    width = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}.get(flat.element_size())
    return flat.view(width) if width is not None and not flat.dtype.is_complex else flat.view(torch.uint8)


def _words(data: torch.Tensor) -> torch.Tensor:
    """Bytes as int64 words where they line up (comparing words is several times faster than comparing bytes)."""
    return data.view(torch.int64) if data.numel() % 8 == 0 and data.storage_offset() % 8 == 0 else data


def _zero_count(tensor: torch.Tensor) -> int:
    """How many values are +0.0 or -0.0 (on the bits: counting floats directly is 8x slower for bf16)."""
    if not tensor.is_floating_point() or tensor.element_size() not in (2, 4):
        return tensor.numel() - int(torch.count_nonzero(tensor))
    return tensor.numel() - int(torch.count_nonzero(_bits(tensor) << 1))  # the sign bit shifted out


def _reference(name: str, tensor: torch.Tensor, targets: dict[str, LayerQuant], mode: str,
               dtype: torch.dtype, scales: dict[str, torch.Tensor]) -> torch.Tensor:
    if name in targets and mode == "quantize":
        return fake_quantize(tensor, targets[name], dtype=dtype, name=name, scales=scales.get(name))
    return tensor.to(dtype) if tensor.is_floating_point() else tensor


class Checker:
    """`--verify`'s check of each input tensor: what it becomes is recomputed from it (the quantizer run again, a
    packed input unpacked again, a packed output's codes packed again) and compared, bit for bit, with the output
    as `written` gives it."""

    def __init__(self, plan: "ConversionPlan", written: "ReadBack | InMemory", progress: ProgressFn | None,
                 total: int):
        self.report = VerifyReport()
        self._plan, self._written, self._progress, self._total = plan, written, progress, total
        self._dtype = getattr(torch, plan.dtype)
        self._unpacker = PackedPairs(plan.packed_shapes, self._dtype)
        self._inputs = {path.name: path for path in plan.files.files}
        self._input_ranges: dict[Path, dict[str, tuple[int, int]]] = {}
        transform = plan.transform()
        self._consumed = frozenset(name for name in plan.specs if transform.consumes(name))

    def check(self, name: str, tensor: torch.Tensor | None) -> None:
        """`tensor` None: one written unchanged, not held meanwhile; compared with its bytes in the input file."""
        plan, report = self._plan, self.report
        if self._progress is not None:
            self._progress("verify", plan.specs[name].nbytes, self._total)
        if name in self._consumed:  # a learned scale: checked through every weight it quantizes
            return
        if tensor is None:
            report.tensors_checked += 1
            source = self._inputs[plan.specs[name].file]
            if source not in self._input_ranges:
                self._input_ranges[source] = tensor_byte_ranges(source)
            if not self._written.same_as_file(name, source, self._input_ranges[source][name][0]):
                report.mismatches.append(name)
            return
        if plan.mode == "unpack":
            fused = self._unpacker.add(name, tensor)
            if not fused:
                return
            ((name, tensor),) = fused
        base = name.removesuffix(".weight")
        if plan.fmt == "packed" and name in plan.targets:
            # The codes and scales the quantizer (or the fused input) gives again, packed again, byte for byte:
            # the padding codes of a row and the scale of a group of zero codes too (unpacking would hide both).
            spec = plan.targets[name]
            expected = (quantize(tensor, spec, name=base, scales=plan.scales.get(name)) if plan.mode == "quantize"
                        else ternary_codes_from_fused(tensor, spec.group_size))
            codes_same = self._written.same(base + PACKED_SUFFIX, pack_ternary(expected.codes))
            report.tensors_checked += 1
            if not (self._written.same(base + SCALE_SUFFIX, expected.scales.to(self._dtype)) and codes_same):
                report.mismatches.append(name)
            report.zero_fraction[name] = _zero_count(expected.codes) / max(expected.codes.numel(), 1)
            return
        reference = _reference(name, tensor, plan.targets, plan.mode, self._dtype, plan.scales)
        identical = self._written.same(name, reference)
        written = reference if identical else self._written.reread(name)
        report.tensors_checked += 1
        if not identical:
            report.mismatches.append(name)
        if name in plan.targets or base in plan.packed_shapes:
            report.zero_fraction[name] = _zero_count(written) / max(written.numel(), 1)
            spec = plan.targets.get(name, LayerQuant("ternary", -1))
            # A tensor identical to its reference holds {-a, 0, +a} per group by construction (the quantizer's
            # output, unpacked codes, or a fused input checked while converting); any other is checked here.
            groups = [spec.group_size] if plan.mode == "quantize" else FUSED_GROUP_CANDIDATES
            if (spec.quant_type == "ternary" and not identical
                    and not any(fused_scales(written, g) is not None for g in groups)):
                report.not_ternary.append(name)


class InMemory:
    """The output of a `.bin` conversion, all in memory until torch.save writes it (and `read_back_bin` reads it
    back)."""

    def __init__(self, state: dict[str, torch.Tensor]):
        self._state = state

    def reread(self, name: str) -> torch.Tensor:
        return self._state[name]

    def same(self, name: str, reference: torch.Tensor) -> bool:
        return _identical(self._state[name], reference)


def read_back_bin(path: Path, state: dict[str, torch.Tensor]) -> list[str]:
    """The tensors that differ between what torch.save wrote and `state` (or are missing on either side)."""
    files, _ = read_tensor_specs(path)
    found = dict(iter_tensors(files))
    return sorted(name for name in found.keys() | state.keys()
                  if name not in found or name not in state or not _identical(found[name], state[name]))


class ReadBack:
    """The output's bytes, read back from the disk with direct I/O while the conversion still writes the file.

    `Verifier` asks for a tensor only once all its bytes are there (`request`); a reading thread of its own
    (`prefetched`) reads what was asked for, in order, a slice at a time (a read stops at the tensor's end), while
    the checking thread recomputes the reference: `same` and `same_as_file` compare the next tensor slice by
    slice. The slices are a few buffers used in turn (a fresh buffer each time is fresh memory the kernel must
    zero: a second of system time at 1B)."""

    SLICE = 8 * 2**20
    AHEAD = 2  # slices read ahead

    def __init__(self, writer: ShardedWriter):
        import queue

        self._writer = writer
        self._requests: queue.SimpleQueue = queue.SimpleQueue()  # lists of output names; None: no more
        self._buffers = [torch.empty(self.SLICE, dtype=torch.uint8) for _ in range(self.AHEAD + 2)]
        self._free: queue.SimpleQueue = queue.SimpleQueue()  # buffers not in use, by index; None: stop reading
        for index in range(len(self._buffers)):
            self._free.put(index)
        self._stream = prefetched(self._read(), max_bytes=self.AHEAD * self.SLICE, name="bitcpm-read-back")
        self._expected = torch.empty(self.SLICE, dtype=torch.uint8)  # input bytes, for `same_as_file`

    def request(self, names: list[str]) -> None:
        self._requests.put(names)

    def _spans(self, name: str) -> range:
        size = self._writer.places[name][2]
        return range(0, max(size, 1), self.SLICE)  # an empty tensor is one empty slice

    def _read(self) -> Iterator[tuple[str, torch.Tensor]]:
        readers: dict[Path, Any] = {}  # the shard being read: the output is read in order, shard after shard
        try:
            for names in iter(self._requests.get, None):
                for name in names:
                    path, begin, size = self._writer.places[name]
                    if path not in readers:
                        for reader in readers.values():  # an earlier shard: done (its fd and window go now)
                            reader.close()
                        readers = {path: open_direct(path)}
                    readers[path].seek(begin)
                    for offset in self._spans(name):
                        index = self._free.get()
                        if index is None:
                            return
                        part = self._buffers[index][:min(self.SLICE, size - offset)]
                        if readers[path].readinto(memoryview(part.numpy())) != part.numel():
                            raise CheckFailed(f"the written output ends inside {name}, short of what its own header "
                                              "says", hint="report this as a bug; nothing was written")
                        yield (name, index), part
        finally:
            for reader in readers.values():
                reader.close()

    def _slices(self, name: str) -> Iterator[torch.Tensor]:
        """The next tensor's slices; each buffer goes back for reading once the caller asks for the next."""
        for _ in self._spans(name):
            (got, index), part = next(self._stream)
            if got != name:
                raise CheckFailed(f"read back {got} where {name} was expected", hint="report this as a bug; nothing "
                                                                                     "was written")
            try:
                yield part
            finally:
                self._free.put(index)

    def same(self, name: str, reference: torch.Tensor) -> bool:
        dtype, shape = self._writer.layout[name]
        expected = reference.contiguous().reshape(-1).view(torch.uint8)
        return (self._matches(name, lambda offset, size: expected[offset:offset + size])
                and (str(reference.dtype), tuple(reference.shape)) == (f"torch.{dtype}", shape))

    def same_as_file(self, name: str, path: Path, begin: int) -> bool:
        """Whether the next tensor's bytes equal those at `begin` in `path` (a tensor written unchanged)."""
        with path.open("rb") as handle:
            handle.seek(begin)

            def expected(offset: int, size: int) -> torch.Tensor:
                part = self._expected[:size]
                return part[:handle.readinto(memoryview(part.numpy()))]

            return self._matches(name, expected)

    def _matches(self, name: str, expected: Callable[[int, int], torch.Tensor]) -> bool:
        same, offset = True, 0
        for part in self._slices(name):  # every slice is taken, so the next tensor starts with its own
            same = same and torch.equal(_words(part), _words(expected(offset, part.numel())))
            offset += part.numel()
        return same

    def reread(self, name: str) -> torch.Tensor:
        """A tensor read from the file again (to say what differs)."""
        path, begin, size = self._writer.places[name]
        data = torch.empty(size, dtype=torch.uint8)
        with path.open("rb") as handle:
            handle.seek(begin)
            handle.readinto(memoryview(data.numpy()))
        dtype, shape = self._writer.layout[name]
        return data.view(getattr(torch, dtype)).reshape(shape)

    def close(self) -> None:
        self._requests.put(None)  # a reading thread waiting for a request or a buffer ends
        self._free.put(None)
        self._stream.close()


class Verifier:
    """`--verify` alongside the conversion. Each input tensor, once the writer has put all that it became in the
    file, goes to a thread of its own (`bitcpm-verify`) that checks it (`Checker`) against the bytes read back
    from the disk (`ReadBack`). The check never waits for the writer; the writer waits for the check only while
    its queue is full. At the end the written headers are read back and must give the planned layout."""

    def __init__(self, plan: "ConversionPlan", writer: ShardedWriter, progress: ProgressFn | None, total: int):
        from collections import deque

        self._writer, self._read_back = writer, ReadBack(writer)
        self._checker = Checker(plan, self._read_back, progress, total)
        self._waiting: deque = deque()  # (input name, tensor, output names) in input order
        self._queue = BackgroundIO(max_pending_bytes=32 * 2**20, name="bitcpm-verify")

    WAITING = 32 * 2**20  # input bytes held for outputs not yet on the disk, at most (plus one tensor)

    def written(self, name: str, tensor: torch.Tensor | None, outputs: list[str]) -> None:
        """On the writing thread, once `outputs` (what `name` became) are written."""
        self._waiting.append((name, tensor, outputs))
        self._release()
        if sum(0 if held is None else held.nbytes for _, held, _ in self._waiting) > self.WAITING:
            # Small outputs (2 bits a weight) fill the writer's window slowly: put them on the disk now.
            self._writer.flush()
            self._release()

    def _release(self) -> None:
        while self._waiting and all(self._writer.on_disk(out) for out in self._waiting[0][2]):
            name, tensor, outputs = self._waiting.popleft()
            self._read_back.request(outputs)
            self._queue.submit(self._checker.check, name, tensor, nbytes=0 if tensor is None else tensor.nbytes)

    def finish(self, staging: Path) -> VerifyReport:
        """The report, once everything is written (every shard closed): the last tensors checked, then the
        layout read back from the written headers (and index) compared with the planned one."""
        self._release()
        if self._waiting:
            raise CheckFailed(f"{len(self._waiting)} tensor(s) never reached the disk",
                              hint="report this as a bug; nothing was written")
        self._queue.drain()
        report = self._checker.report
        out_files, out_specs = read_tensor_specs(staging)
        found = {name: (path, *span) for path in out_files.files for name, span in tensor_byte_ranges(path).items()}
        index = read_json(out_files.index, "weight index") if out_files.index else {}
        weight_map = index.get("weight_map", {})
        planned, layout = self._writer.places, self._writer.layout
        report.mismatches += sorted(
            name for name in planned.keys() | found.keys() | weight_map.keys()
            if name not in planned or name not in found or found[name] != planned[name]
            or (out_specs[name].dtype, out_specs[name].shape) != layout[name]
            or (out_files.index is not None and weight_map.get(name) != planned[name][0].name))
        # The header metadata (the packed linears' shapes) and the index's total size are read back too.
        report.mismatches += sorted(f"{path.name} (metadata)" for path in out_files.files
                                    if safetensors_metadata(path) != self._writer.metadata.get(path))
        if out_files.index is not None and index.get("metadata", {}).get("total_size") != self._writer.total_size:
            report.mismatches.append(f"{out_files.index.name} (total_size)")
        return report

    def __enter__(self) -> "Verifier":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self._queue.__exit__(exc_type, exc, tb)  # after a failure, what is queued is not run
        finally:
            self._read_back.close()
