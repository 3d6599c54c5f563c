"""A checkpoint's files: locate its weight files (a folder, a sharded index, or one file), read every tensor's shape
and dtype from headers alone, read config.json, and iterate or fetch its tensors.

Header-only reading never materialises tensor data: safetensors headers are parsed directly (8-byte length + JSON),
and pickled `.bin` files are opened with `torch.load(mmap=True, weights_only=True)`, which maps the data without
reading it and never executes pickled code. Time and memory do not grow with the size of the weights.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from bitcpm_cli.core.errors import ConfigError, InputError
from bitcpm_cli.core.io.readers import file_problem, parse_json, read_json_file
from bitcpm_cli.core.io.safetensors import (
    MAX_HEADER_BYTES,
    SAFETENSORS_DTYPES,
    check_safetensors_header,
    in_file_order,
    safetensors_layout,
    tensor_nbytes,
)

SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"


@dataclass(frozen=True)
class TensorSpec:
    """A tensor as its file header describes it."""

    shape: tuple[int, ...]
    dtype: str  # torch dtype name: "bfloat16", "float32", ...
    file: str

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.dtype, self.shape)


@dataclass(frozen=True)
class WeightFiles:
    format: str  # "safetensors" | "bin"
    files: tuple[Path, ...]
    index: Path | None = None


def find_weight_files(path: str | Path) -> WeightFiles:
    """The weight files of a model directory (or a single weight file), preferring safetensors."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"no such file or directory ({path})", hint="pass a Hugging Face model directory")
    if not path.is_dir() and (problem := file_problem(path, "the weight file")):
        raise InputError(problem, hint="pass a model folder or a .safetensors / .bin file")
    if path.is_file():
        if path.suffix == ".safetensors":
            return WeightFiles("safetensors", (path,))
        if path.suffix in (".bin", ".pt", ".pth"):
            return WeightFiles("bin", (path,))
        raise InputError(f"not a weight file ({path})", hint="expected .safetensors, .bin, .pt or .pth")
    for index_name, fmt in ((SAFETENSORS_INDEX, "safetensors"), (BIN_INDEX, "bin")):
        index = path / index_name
        if index.is_file():
            return WeightFiles(fmt, _shards_from_index(index), index)
    for pattern, fmt in (("*.safetensors", "safetensors"), ("pytorch_model*.bin", "bin"), ("model*.bin", "bin")):
        files = tuple(sorted(path.glob(pattern)))
        if files:
            return WeightFiles(fmt, files)
    raise InputError(
        f"no weights found in {path}",
        hint="expected model.safetensors, *.safetensors, pytorch_model.bin or a sharded index "
             f"({SAFETENSORS_INDEX} / {BIN_INDEX})",
    )


def _shards_from_index(index: Path) -> tuple[Path, ...]:
    data = read_json(index, "weight index")
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise InputError(f"weight index has no 'weight_map' ({index})", hint="regenerate the index with save_pretrained")
    folder = index.parent.resolve()
    shards: dict[str, Path] = {}
    for tensor, shard in weight_map.items():
        if not isinstance(shard, str):
            raise InputError(f"weight index entry {tensor[:80]!r} is not a file name ({index}): {str(shard)[:80]}",
                             hint="each weight_map value must name a shard file in the model folder")
        if shard not in shards:
            shards[shard] = _confined_shard(folder, tensor, shard, index)
    missing = [s for s, path in sorted(shards.items()) if not path.exists()]
    unreadable = [problem for s, path in sorted(shards.items()) if s not in missing
                  and (problem := file_problem(path, f"shard {s}"))]
    if missing:
        raise InputError(
            f"weight index names {len(missing)} missing shard(s) ({index}): {', '.join(missing)}",
            hint="download or copy the missing shard files next to the index",
        )
    if unreadable:
        raise InputError(f"weight index names {len(unreadable)} shard(s) that are not regular files ({index}): "
                         + unreadable[0], hint="each shard must be a regular safetensors / .bin file",
                         problems=unreadable if len(unreadable) > 1 else ())
    return tuple(index.parent / s for s in sorted(shards))


def _confined_shard(folder: Path, tensor: str, shard: str, index: Path) -> Path:
    """A shard named by an index: a plain file name inside the model folder, also after resolving symlinks."""
    hint = "each weight_map value must name a shard file inside the model folder (no '..', no absolute path)"
    pure = Path(shard)
    if not shard or pure.is_absolute() or ".." in pure.parts or "\\" in shard or "\0" in shard:
        raise InputError(f"weight index entry {tensor[:80]!r} points outside the model folder: {shard!r} ({index})",
                         hint=hint)
    target = (folder / pure).resolve()
    if folder not in target.parents:
        raise InputError(f"weight index entry {tensor[:80]!r} leads outside the model folder through a symlink: "
                         f"{shard!r} -> {target} ({index})", hint=hint)
    return folder / pure


def read_json(path: Path, what: str) -> Any:
    """A JSON file through the careful reader (size, depth and integer limits; errors name file and line)."""
    return read_json_file(path, what, 64 * 2**20, error=ConfigError)


def read_config(model_dir: str | Path) -> dict[str, Any]:
    path = Path(model_dir) / "config.json"
    config = read_json(path, "config.json")
    if not isinstance(config, dict):
        raise ConfigError(f"config.json must hold a JSON object ({path})", hint="restore it from the model's source")
    return config


def read_safetensors_header(path: Path) -> dict[str, TensorSpec]:
    """Tensor specs from a safetensors header, checking the file holds every byte the header promises."""
    hint = "the file is corrupt or truncated: download or copy it again"
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise InputError(f"safetensors file is truncated: {size} bytes, no header ({path})", hint=hint)
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
                raise InputError(f"safetensors header is corrupt or truncated: it claims {header_len} bytes "
                                 f"in a {size}-byte file ({path})", hint=hint)
            raw = handle.read(header_len)
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror or exc}", hint="check the file's permissions") from None
    header = parse_json(raw, str(path), "safetensors header")
    entries = check_safetensors_header(header, size - 8 - header_len, path)
    return {name: TensorSpec(tuple(e["shape"]), SAFETENSORS_DTYPES[e["dtype"]], path.name)
            for name, e in entries.items()}


def _load_bin_state(path: Path) -> dict[str, Any]:
    """A pickled state dict, memory-mapped (data not read until used) and loaded with weights_only=True, so no code
    runs; a `{"state_dict": ...}` wrapper is unwrapped. Anything else is an InputError."""
    import pickle

    import torch

    try:
        try:
            state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except RuntimeError as exc:
            if "_use_new_zipfile_serialization" not in str(exc):
                raise
            # The format torch wrote before 1.6 cannot be memory-mapped: the same weights_only load reads it whole.
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise InputError(
            f"refusing to load {path}: it holds objects other than tensors ({str(exc).splitlines()[0][:200]})",
            hint="bitcpm only loads .bin files with weights_only=True; convert the checkpoint to safetensors "
                 "with a tool you trust",
        ) from None
    except Exception as exc:
        raise InputError(f"cannot read {path}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}",
                         hint="the file is corrupt, truncated or not a torch checkpoint") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise InputError(f"{path} does not hold a state dict (found {type(state).__name__})",
                         hint="expected a mapping of parameter names to tensors")
    return state


def read_bin_specs(path: Path) -> dict[str, TensorSpec]:
    """Tensor specs of a pickled state dict (`_load_bin_state`: memory-mapped, data not read, no code run)."""
    import torch

    return {name: TensorSpec(tuple(t.shape), str(t.dtype).removeprefix("torch."), path.name)
            for name, t in _load_bin_state(path).items() if isinstance(t, torch.Tensor)}


def read_tensor_specs(path: str | Path) -> tuple[WeightFiles, dict[str, TensorSpec]]:
    """Every tensor's shape and dtype, from headers alone, for a model directory or a single weight file."""
    files = find_weight_files(path)
    specs: dict[str, TensorSpec] = {}
    for file in files.files:
        part = read_safetensors_header(file) if files.format == "safetensors" else read_bin_specs(file)
        duplicates = sorted(set(part) & set(specs))
        if duplicates:
            raise InputError(f"tensor {duplicates[0]!r} appears in more than one weight file ({file})",
                             hint="remove stale shards from the directory")
        specs.update(part)
    if not specs:
        raise InputError(f"the weight files hold no tensors ({path})", hint="check that the download completed")
    return files, specs


READ_SLICE = 2**20  # bytes read (and hashed) at a time: fits in a core's L2 cache


def iter_safetensors(path: Path, hasher=None) -> Iterator[tuple[str, Any]]:
    """(name, tensor) in file order, one tensor in memory at a time (plain reads, no mmap).

    With `hasher`, every byte of the file is fed to it in order, so its digest is the file's sha256.
    """
    import torch

    read_safetensors_header(path)  # validates sizes and offsets first
    start, header, _ = safetensors_layout(path)
    entries = sorted(header.items(), key=lambda item: in_file_order(item[1]))
    with path.open("rb") as handle:
        prefix = handle.read(start)
        if hasher is not None:
            hasher.update(prefix)
        for name, entry in entries:  # the header check has the tensors tile the data: no seeking
            begin, end = entry["data_offsets"]
            buffer = torch.empty(end - begin, dtype=torch.uint8)
            view = memoryview(buffer.numpy())
            # Read a slice at a time and hash it while it is still in the CPU cache, rather than streaming the
            # whole tensor through memory a second time for the digest.
            for offset in range(0, end - begin, READ_SLICE):
                part = view[offset:offset + READ_SLICE]
                if handle.readinto(part) != len(part):
                    raise InputError(f"safetensors file is truncated while reading {name!r} ({path})",
                                     hint="download or copy the file again")
                if hasher is not None:
                    hasher.update(part)
            dtype = getattr(torch, SAFETENSORS_DTYPES[entry["dtype"]])
            yield name, buffer.view(dtype).reshape(entry["shape"])


def iter_bin(path: Path, hasher=None) -> Iterator[tuple[str, Any]]:
    """(name, tensor) of a pickled state dict, memory-mapped and loaded with weights_only=True."""
    import torch

    state = _load_bin_state(path)  # refuses pickles that are not plain tensors, with a clear message
    if hasher is not None:
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(2**24), b""):
                hasher.update(block)
    for name in list(state):
        tensor = state.pop(name)
        if isinstance(tensor, torch.Tensor):
            yield name, tensor


def iter_tensors(files: WeightFiles, hasher=None) -> Iterator[tuple[str, Any]]:
    """Every tensor of a checkpoint, one at a time; `hasher` sees every byte of every file, in order."""
    for file in files.files:
        if files.format == "safetensors":
            yield from iter_safetensors(file, hasher)
        else:
            yield from iter_bin(file, hasher)


def tensor_order(files: WeightFiles, specs: dict[str, TensorSpec]) -> list[str]:
    """The order in which iter_tensors yields tensors (from headers alone)."""
    if files.format != "safetensors":
        return list(specs)
    order = []
    for file in files.files:
        _, header, _ = safetensors_layout(file)
        order += sorted(header, key=lambda name: in_file_order(header[name]))
    return order


class TensorReader:
    """Tensors by name, without reading the others; each file is opened once (a safetensors handle, or one
    memory-mapped, weights_only load of a .bin), however many tensors are asked for."""

    def __init__(self, files: WeightFiles, specs: dict[str, TensorSpec]):
        self.files, self.specs = files, specs
        self._open: dict[str, Any] = {}

    def _handle(self, file: str) -> Any:
        if file not in self._open:
            path = next(f for f in self.files.files if f.name == file)
            if self.files.format == "safetensors":
                from safetensors import safe_open

                self._open[file] = safe_open(str(path), framework="pt")
            else:
                self._open[file] = _load_bin_state(path)
        return self._open[file]

    def __getitem__(self, name: str):
        handle = self._handle(self.specs[name].file)
        if self.files.format == "safetensors":
            return handle.get_tensor(name)  # a copy, not a view of the file
        return handle[name].clone()  # detach from the memory map
