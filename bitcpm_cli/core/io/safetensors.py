"""The safetensors format, owned here: the header check (every entry's dtype, shape and offsets; offsets in range,
tensors not overlapping, shape x dtype size == bytes), the dtype tables, the layout of a file's data, and the
streaming writer (header first, then each tensor in turn through direct I/O).
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

from bitcpm_cli.core.errors import InputError
from bitcpm_cli.core.io.direct import DirectFile
from bitcpm_cli.core.io.readers import is_int, parse_json

# ---- safetensors headers ------------------------------------------------------------------------------
# Every safetensors dtype bitcpm reads: (torch dtype name, bytes an element). The one table; checkpoint derives
# its name mapping from it.
SAFETENSORS_TYPES = {
    "F64": ("float64", 8), "F32": ("float32", 4), "F16": ("float16", 2), "BF16": ("bfloat16", 2),
    "F8_E4M3": ("float8_e4m3fn", 1), "F8_E5M2": ("float8_e5m2", 1), "I64": ("int64", 8), "I32": ("int32", 4),
    "I16": ("int16", 2), "I8": ("int8", 1), "U8": ("uint8", 1), "BOOL": ("bool", 1), "U16": ("uint16", 2),
    "U32": ("uint32", 4), "U64": ("uint64", 8),
}


def check_safetensors_header(header: Any, data_bytes: int, path: Path) -> dict[str, dict[str, Any]]:
    """The tensor entries of a parsed header, each checked: known dtype, non-negative integer shape, offsets
    inside the data section, shape x dtype size equal to the byte range, the tensors covering the data section
    exactly (no overlap, no gap, no trailing bytes: what the safetensors library itself requires)."""
    hint = "the file is corrupt or truncated: download or copy it again"
    if not isinstance(header, dict):
        raise InputError(f"safetensors header is not a JSON object ({path})", hint=hint)
    metadata = header.get("__metadata__")
    if metadata is not None and not (isinstance(metadata, dict)
                                     and all(isinstance(v, str) for v in metadata.values())):
        raise InputError(f"safetensors __metadata__ must map names to strings ({path})", hint=hint)
    entries: dict[str, dict[str, Any]] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        where = f"safetensors header entry {name[:80]!r}"
        if not (isinstance(entry, dict) and isinstance(entry.get("dtype"), str)
                and entry["dtype"] in SAFETENSORS_TYPES and isinstance(entry.get("shape"), list) and all(is_int(d) and d >= 0 for d in entry["shape"])
                and isinstance(entry.get("data_offsets"), list) and len(entry["data_offsets"]) == 2
                and all(is_int(o) for o in entry["data_offsets"])):
            raise InputError(f"{where} is malformed: needs a known dtype, a shape of non-negative integers and two "
                             f"integer data_offsets ({path})", hint=hint)
        begin, end = entry["data_offsets"]
        if not 0 <= begin <= end:
            raise InputError(f"{where} has invalid offsets [{begin}, {end}] ({path})", hint=hint)
        if end > data_bytes:
            raise InputError(f"safetensors file is truncated: {where} ends at byte {end} of a {data_bytes}-byte "
                             f"data section ({path})", hint=hint)
        expected = SAFETENSORS_TYPES[entry["dtype"]][1] * math.prod(entry["shape"])
        if expected != end - begin:
            raise InputError(f"{where}: shape {entry['shape']} of {entry['dtype']} needs {expected} bytes, its "
                             f"offsets hold {end - begin} ({path})", hint=hint)
        entries[name] = entry
    # Empty tensors too: one inside another tensor's bytes is an overlap, as the safetensors library says.
    spans = sorted((e["data_offsets"][0], e["data_offsets"][1], n) for n, e in entries.items())
    covered, last = 0, None  # like safetensors itself: the tensors tile the data section exactly, from byte 0
    for begin, end, name in spans:
        if begin < covered:
            raise InputError(f"safetensors header entries {last[:80]!r} and {name[:80]!r} overlap ({path})",
                             hint=hint)
        if begin > covered:
            raise InputError(f"safetensors data bytes {covered}-{begin} belong to no tensor (before "
                             f"{name[:80]!r}) ({path})", hint=hint)
        covered, last = end, name
    if covered != data_bytes:
        raise InputError(f"safetensors data section has {data_bytes - covered} bytes after the last tensor "
                         f"({path})", hint=hint)
    return entries


MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit
SAFETENSORS_DTYPES = {key: name for key, (name, _) in SAFETENSORS_TYPES.items()}  # safetensors -> torch name
DTYPE_BYTES = dict(SAFETENSORS_TYPES.values())  # torch name -> bytes per element


def tensor_nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    """Bytes of a tensor of this torch dtype name and shape."""
    return DTYPE_BYTES[dtype] * math.prod(shape)


# ---- streaming tensor I/O -------------------------------------------------------------------------
TORCH_TO_SAFETENSORS = {v: k for k, v in SAFETENSORS_DTYPES.items()}


def safetensors_layout(path: Path) -> tuple[int, dict[str, Any], dict[str, str]]:
    """(data start, {name: header entry}, metadata), after read_safetensors_header validated the file."""
    with path.open("rb") as handle:
        (header_len,) = struct.unpack("<Q", handle.read(8))
        header = parse_json(handle.read(header_len), str(path), "safetensors header")
    metadata = header.pop("__metadata__", None) or {}
    return 8 + header_len, header, metadata


def safetensors_metadata(path: Path) -> dict[str, str]:
    return safetensors_layout(path)[2]


def tensor_byte_ranges(path: Path) -> dict[str, tuple[int, int]]:
    """(offset in the file, length) of every tensor's data in a safetensors file."""
    start, header, _ = safetensors_layout(path)
    return {name: (start + entry["data_offsets"][0], entry["data_offsets"][1] - entry["data_offsets"][0])
            for name, entry in header.items()}


def in_file_order(entry: dict[str, Any]) -> tuple[int, int]:
    """Sort key of header entries in the order their bytes lie in the file (an empty tensor before the one that
    starts where it does)."""
    return entry["data_offsets"][0], entry["data_offsets"][1]


class SafetensorsStreamWriter:
    """Write a safetensors file tensor by tensor: the header is laid out first from the known specs."""

    def __init__(self, path: Path, specs: list[tuple[str, str, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None):
        self._expected = []
        header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
        offset = 0
        for name, dtype, shape in specs:
            size = tensor_nbytes(dtype, shape)
            header[name] = {"dtype": TORCH_TO_SAFETENSORS[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + size]}
            self._expected.append((name, dtype, tuple(shape), size))
            offset += size
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * ((-len(raw)) % 8)
        self.path = path
        self.nbytes = 8 + len(raw) + offset
        # (offset in the file, length) of every tensor's bytes, as tensor_byte_ranges reads them back
        self.ranges = {name: (8 + len(raw) + header[name]["data_offsets"][0], size)
                       for name, _, _, size in self._expected}
        self._handle = DirectFile(path)
        self._handle.write(struct.pack("<Q", len(raw)) + raw)
        self._next = 0

    @property
    def durable(self) -> int:
        """Every byte before this offset is in the file (DirectFile.durable)."""
        return self._handle.durable

    def flush(self) -> None:
        self._handle.flush()

    def write(self, name: str, tensor) -> None:
        import torch

        expected_name, dtype, shape, size = self._expected[self._next]
        if name != expected_name or str(tensor.dtype) != f"torch.{dtype}" or tuple(tensor.shape) != shape:
            raise RuntimeError(f"safetensors stream: got {name} {tensor.dtype} {tuple(tensor.shape)}, "
                               f"expected {expected_name} {dtype} {shape}")
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        self._handle.write(memoryview(data.numpy()))
        self._next += 1

    def abort(self) -> None:
        """Close the file, unfinished, after a failure (it is being thrown away)."""
        self._handle.abort()

    def close(self) -> None:
        self._handle.close()
        if self._next != len(self._expected):
            raise RuntimeError(f"safetensors stream {self.path}: {len(self._expected) - self._next} tensors unwritten")
