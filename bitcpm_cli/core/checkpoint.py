"""Checkpoint I/O: locate weight files, read tensor shapes from headers alone, read config.json, write atomically.

Header-only reading never materialises tensor data: safetensors headers are parsed directly (8-byte length + JSON),
and pickled `.bin` files are opened with `torch.load(mmap=True, weights_only=True)`, which maps the data without
reading it and never executes pickled code. Time and memory do not grow with the size of the weights.
"""

from __future__ import annotations

import errno
import json
import math
import os
import struct
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from bitcpm_cli.core.errors import ConfigError, InputError
from bitcpm_cli.core.readers import SAFETENSORS_TYPES, check_safetensors_header, parse_json, read_json_file

SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit
SAFETENSORS_DTYPES = {key: name for key, (name, _) in SAFETENSORS_TYPES.items()}  # safetensors -> torch name
DTYPE_BYTES = dict(SAFETENSORS_TYPES.values())  # torch name -> bytes per element


def tensor_nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    """Bytes of a tensor of this torch dtype name and shape."""
    return DTYPE_BYTES[dtype] * math.prod(shape)


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
    missing = [s for s, path in sorted(shards.items()) if not path.is_file()]
    if missing:
        raise InputError(
            f"weight index names {len(missing)} missing shard(s) ({index}): {', '.join(missing)}",
            hint="download or copy the missing shard files next to the index",
        )
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


def dtype_kwarg() -> str:
    """transformers renamed from_pretrained's `torch_dtype` to `dtype` in 4.56."""
    import transformers
    from packaging.version import Version

    return "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"


REMOTE_CODE_HINT = ("bitcpm never runs a model folder's own Python code unless asked: read its .py files, and pass "
                    "--trust-remote-code only if you trust them")


def _asks_for_code(path: Path) -> str | None:
    for name in ("config.json", "tokenizer_config.json"):
        file = path / name
        if file.is_file():
            data = read_json(file, name)
            if isinstance(data, dict) and data.get("auto_map"):
                return f"{file} maps classes to the folder's own code (auto_map)"
    return None


def refuse_remote_code(path: str | Path, hint: str = REMOTE_CODE_HINT) -> None:
    """For readers that never run remote code (and libraries that might prompt for it): refuse such a folder."""
    reason = _asks_for_code(Path(path)) if Path(path).is_dir() else None
    if reason:
        raise InputError(f"refusing to load {path}: {reason}", hint=hint)


@contextmanager
def hf_loading(path: str | Path) -> Iterator[None]:
    """Around a transformers load with trust_remote_code=False: a folder that needs its own code is exit 2."""
    try:
        yield
    except ValueError as exc:
        text = str(exc)
        if "custom code" in text or "trust_remote_code" in text:
            reason = _asks_for_code(Path(path)) or "it needs its own Python code"
            raise InputError(f"refusing to load {path}: {reason}", hint=REMOTE_CODE_HINT) from None
        raise


def load_tokenizer(path: str | Path, trust_remote_code: bool = False, padding_side: str = "right"):
    """The model folder's tokenizer (local files only), with a pad token."""
    from transformers import AutoTokenizer

    if not Path(path).is_dir():
        raise InputError(f"tokenizer folder not found ({path})", hint="pass the model or tokenizer folder")
    try:
        with hf_loading(path):
            tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError) as exc:
        raise InputError(f"no usable tokenizer in {path} ({str(exc).splitlines()[0][:160]})",
                         hint="copy the tokenizer files (tokenizer.json / tokenizer.model, tokenizer_config.json) "
                              "into the model folder") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = padding_side
    return tokenizer


# ---- streaming tensor I/O -------------------------------------------------------------------------
TORCH_TO_SAFETENSORS = {v: k for k, v in SAFETENSORS_DTYPES.items()}


def _safetensors_layout(path: Path) -> tuple[int, dict[str, Any], dict[str, str]]:
    """(data start, {name: header entry}, metadata), after read_safetensors_header validated the file."""
    with path.open("rb") as handle:
        (header_len,) = struct.unpack("<Q", handle.read(8))
        header = parse_json(handle.read(header_len), str(path), "safetensors header")
    metadata = header.pop("__metadata__", None) or {}
    return 8 + header_len, header, metadata


def safetensors_metadata(path: Path) -> dict[str, str]:
    return _safetensors_layout(path)[2]


def tensor_byte_ranges(path: Path) -> dict[str, tuple[int, int]]:
    """(offset in the file, length) of every tensor's data in a safetensors file."""
    start, header, _ = _safetensors_layout(path)
    return {name: (start + entry["data_offsets"][0], entry["data_offsets"][1] - entry["data_offsets"][0])
            for name, entry in header.items()}


def _in_file_order(entry: dict[str, Any]) -> tuple[int, int]:
    """Sort key of header entries in the order their bytes lie in the file (an empty tensor before the one that
    starts where it does)."""
    return entry["data_offsets"][0], entry["data_offsets"][1]


READ_SLICE = 2**20  # bytes read (and hashed) at a time: fits in a core's L2 cache


def iter_safetensors(path: Path, hasher=None) -> Iterator[tuple[str, Any]]:
    """(name, tensor) in file order, one tensor in memory at a time (plain reads, no mmap).

    With `hasher`, every byte of the file is fed to it in order, so its digest is the file's sha256.
    """
    import torch

    read_safetensors_header(path)  # validates sizes and offsets first
    start, header, _ = _safetensors_layout(path)
    entries = sorted(header.items(), key=lambda item: _in_file_order(item[1]))
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
        _, header, _ = _safetensors_layout(file)
        order += sorted(header, key=lambda name: _in_file_order(header[name]))
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


DIRECT_READS = hasattr(os, "O_DIRECT") and hasattr(os, "preadv")  # Linux


class _Direct:
    """A file opened for direct I/O (O_DIRECT, Linux) where the filesystem takes it, with one page-aligned buffer:
    direct I/O moves whole aligned blocks between that buffer and the disk, bypassing the page cache. On a
    filesystem that refuses direct I/O (tmpfs before Linux 6.6, some network filesystems), at open or at the first
    transfer, and where there is no O_DIRECT, the file is used through the page cache instead: the bytes are the
    same either way, only the speed differs."""

    ALIGN = 4096  # a multiple of every device's logical block size: what direct I/O needs of offsets and lengths
    WINDOW = 8 * 2**20  # bytes moved at a time

    def __init__(self, path: Path, flags: int):
        import mmap

        self._fd = None
        self._buffer = mmap.mmap(-1, self.WINDOW)  # page-aligned
        self._view = memoryview(self._buffer)
        flags |= getattr(os, "O_BINARY", 0)
        self.direct = bool(getattr(os, "O_DIRECT", 0))
        if self.direct:
            try:
                self._fd = os.open(path, flags | os.O_DIRECT, 0o666)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                self.direct = False
        if self._fd is None:
            self._fd = os.open(path, flags, 0o666)

    def _transfer(self, call) -> int:
        try:
            return call()
        except OSError as exc:
            if not (self.direct and exc.errno == errno.EINVAL):
                raise
        self._buffered()  # opened for direct I/O, but the filesystem refuses the transfer itself
        return call()

    def _buffered(self) -> None:
        import fcntl

        fcntl.fcntl(self._fd, fcntl.F_SETFL, fcntl.fcntl(self._fd, fcntl.F_GETFL) & ~os.O_DIRECT)
        self.direct = False

    def abort(self) -> None:
        """Close the file without writing what is buffered (after a failure: the file is being thrown away)."""
        fd, self._fd = self._fd, None
        self._view = self._buffer = None  # unmapped once no slice is left (a traceback may hold one)
        if fd is not None:
            os.close(fd)

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None:
            self.abort()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class DirectFile(_Direct):
    """A new file of gigabytes written with direct I/O: bytes are gathered in the aligned buffer and go from there
    to the disk, instead of being copied into as much freshly allocated page cache for the kernel to write back
    later (DeepSpeed's FastPersist writes checkpoints the same way; converting a 1B-shaped model took about a
    quarter less wall time). The unaligned tail is written through the page cache. After a failed write the file
    only closes."""

    def __init__(self, path: Path):
        super().__init__(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        self._used = 0
        self._failed = False
        self._transferred = 0  # bytes handed to the file so far

    @property
    def durable(self) -> int:
        """Every byte before this offset is in the file and stays as it is (a multiple of ALIGN, so a DirectReader
        asked for bytes before it never reads a block still being written)."""
        return self._transferred - self._transferred % self.ALIGN

    def write(self, data) -> None:
        data = memoryview(data).cast("B")
        while len(data):
            take = min(len(data), len(self._view) - self._used)
            self._view[self._used:self._used + take] = data[:take]
            self._used += take
            data = data[take:]
            if self._used == len(self._view):
                self._write_all(self._view)
                self._used = 0

    def flush(self) -> None:
        """Write the whole blocks gathered so far (what `durable` counts), keeping the partial last one."""
        aligned = self._used - self._used % self.ALIGN
        if aligned:
            self._write_all(self._view[:aligned])
            self._used -= aligned
            self._view[:self._used] = self._view[aligned:aligned + self._used]

    def _write_all(self, data: memoryview) -> None:
        if self._failed:
            raise OSError(errno.EIO, "an earlier write to this file failed")
        try:
            while len(data):
                done = self._transfer(lambda: os.write(self._fd, data))
                self._transferred += done
                data = data[done:]
        except BaseException:
            self._failed = True
            raise

    def close(self) -> None:
        if self._fd is None:
            return
        if self._failed:
            self.abort()
            raise OSError(errno.EIO, "closing a file whose earlier write failed: it is incomplete")
        try:
            self.flush()
            if self._used:  # the partial last block
                if self.direct:
                    self._buffered()
                self._write_all(self._view[:self._used])
        finally:
            self.abort()  # everything is written: this only closes


class DirectReader(_Direct):
    """A file read with direct I/O through the aligned buffer, one window at a time: for reading back a file
    written by DirectFile, which the page cache does not hold (direct reads come in whole windows, the page
    cache's read-ahead in small steps: twice as fast here). A minimal binary file object: read, readinto, seek.

    A window reaches no further than the block holding the last byte asked for, so a file still being written is
    read safely below its writer's `DirectFile.durable`."""

    def __init__(self, path: Path):
        super().__init__(path, os.O_RDONLY)
        self._start = self._length = self._position = 0  # the window holds [start, start + length)

    def seek(self, position: int) -> int:
        self._position = position
        return position

    def _fill(self, wanted: int) -> None:
        """Read the window holding the current position, as far as the block holding the last of the `wanted`
        bytes (or the end of the file)."""
        self._start, self._length = self._position - self._position % self.ALIGN, 0
        size = min(len(self._view), -(-(self._position + wanted - self._start) // self.ALIGN) * self.ALIGN)
        while self._length < size:
            got = self._transfer(lambda: os.preadv(self._fd, [self._view[self._length:size]],
                                                   self._start + self._length))
            self._length += got
            if got == 0 or (self.direct and self._length % self.ALIGN):
                break  # the end of the file (a direct read short of a block boundary ends there)

    def readinto(self, out) -> int:
        out = memoryview(out).cast("B")
        done = 0
        while done < len(out):
            offset = self._position - self._start
            if not 0 <= offset < self._length:
                self._fill(len(out) - done)
                offset = self._position - self._start
                if offset >= self._length:
                    break  # end of file
            take = min(len(out) - done, self._length - offset)
            out[done:done + take] = self._view[offset:offset + take]
            done += take
            self._position += take
        return done

    def read(self, size: int) -> bytes:
        data = bytearray(size)
        return bytes(data[:self.readinto(data)])

    def close(self) -> None:
        self.abort()


def open_direct(path: Path):
    """A binary file object for reading: a DirectReader where direct reads exist (Linux), else a plain one."""
    return DirectReader(path) if DIRECT_READS else path.open("rb")


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


class BackgroundIO:
    """Runs file writes (or any calls) on one background thread, in the order they are submitted, while the caller
    quantizes the next tensor (the write syscalls release the GIL while torch computes). At most
    `max_pending_bytes` of buffers wait (plus the one just submitted), so memory stays bounded; a failure in the
    background is raised in the caller at its next submit or at the end, and what was queued after it does not run.

        with BackgroundIO() as io:
            for name, tensor in prefetched(iter_tensors(files, digest)):
                io.submit(writer.write, name, transform(tensor), nbytes=...)
    """

    def __init__(self, max_pending_bytes: int = 128 * 2**20, name: str = "bitcpm-io"):
        from collections import deque
        from concurrent.futures import ThreadPoolExecutor

        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._pending: deque = deque()
        self._pending_bytes, self._limit = 0, max_pending_bytes
        self._failed = False  # set by the background thread: what was queued after a failure does not run

    def _run(self, fn, args) -> None:
        if self._failed:
            return
        try:
            fn(*args)
        except BaseException:
            self._failed = True
            raise

    def submit(self, fn, *args, nbytes: int = 0) -> None:
        self._pending.append((self._pool.submit(self._run, fn, args), nbytes))
        self._pending_bytes += nbytes
        while self._pending and (self._pending[0][0].done() or self._pending_bytes > self._limit):
            self._wait_oldest()

    def _wait_oldest(self) -> None:
        future, nbytes = self._pending.popleft()
        self._pending_bytes -= nbytes
        future.result()

    def drain(self) -> None:
        """Wait for everything submitted (raising the first failure)."""
        while self._pending:
            self._wait_oldest()

    def __enter__(self) -> "BackgroundIO":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self.drain()
        finally:
            for future, _ in self._pending:
                future.cancel()
            self._pool.shutdown(wait=True)  # nothing runs on once the caller moves on (to clean up, say)


def prefetched(items: Iterator[tuple[str, Any]], max_bytes: int = 64 * 2**20,
               name: str = "bitcpm-read") -> Iterator[tuple[str, Any]]:
    """(name, tensor) pairs of `items`, read ahead on a background thread (file reads release the GIL) while the
    caller works on the previous ones. Reading stops while more than `max_bytes` of tensors wait, so at most that
    plus one tensor is held ahead. A failure while reading is raised in the caller, in its place in the order."""
    import threading
    from collections import deque

    ready: deque = deque()
    state = {"bytes": 0, "stop": False, "done": False, "error": None}
    changed = threading.Condition()

    def read() -> None:
        try:
            for name, tensor in items:
                with changed:
                    ready.append((name, tensor))
                    state["bytes"] += tensor.nbytes
                    changed.notify_all()
                    changed.wait_for(lambda: state["stop"] or state["bytes"] <= max_bytes)
                    if state["stop"]:
                        return
        except BaseException as exc:  # handed to the caller, raised there
            state["error"] = exc
        finally:
            with changed:
                state["done"] = True
                changed.notify_all()

    reader = threading.Thread(target=read, name=name, daemon=True)
    reader.start()
    try:
        while True:
            with changed:
                changed.wait_for(lambda: ready or state["done"])
                if not ready:
                    if state["error"] is not None:
                        raise state["error"]
                    return
                name, tensor = ready.popleft()
                state["bytes"] -= tensor.nbytes
                changed.notify_all()
            yield name, tensor
    finally:
        with changed:
            state["stop"] = True
            changed.notify_all()
        reader.join()
        close = getattr(items, "close", None)
        if close is not None:
            close()
