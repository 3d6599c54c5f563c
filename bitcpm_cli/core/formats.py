"""The on-disk formats bitcpm writes and reads, defined once: the packed checkpoint (its names, its reader), the GGUF
block types used for ternary weights (encoders and decoders), and the sha256 fingerprint of a file or checkpoint.
Writers (`convert`, GGUF export) and readers (`infer`, the engines) import them from here.

GGUF blocks (ggml's layouts, little-endian, `d` an fp16 scale):

- TQ2_0: 256 values in 66 bytes: 64 bytes of 2-bit codes `q + 1`, then `d`; value `q * d`. Byte `j` of the
  32-byte chunk `c` holds values `128 c + 32 k + j` at bits `2 k`.
- Q4_0: 32 values in 18 bytes: `d`, then 16 bytes; byte `j` holds value `j` (low nibble) and `j + 16` (high);
  value `(q - 8) * d`. Ternary codes with `d = s` are `q` in {7, 8, 9}.
- Q8_0: 32 values in 34 bytes: `d`, then 32 int8 `q`; value `q * d`.

Every encoder here is checked by decoding: a tensor is written in a type only when the decoded values equal the
fused weights exactly (tests compare these decoders with gguf-py's, which follows ggml).
"""

from __future__ import annotations

import hashlib
import math
from contextlib import closing
from pathlib import Path
from typing import Any

import torch

from bitcpm_cli.core.checkpoint import TensorSpec, WeightFiles, iter_tensors, safetensors_metadata
from bitcpm_cli.core.errors import InputError
from bitcpm_cli.core.quant import Quantized, row_blocks, unpack_ternary
from bitcpm_cli.core.readers import parse_json

# ---- the packed checkpoint (convert --format packed) ------------------------------------------------------------
PACKED_SUFFIX, SCALE_SUFFIX = ".weight_packed", ".weight_scale"
PACKED_SHAPES_KEY = "bitcpm.packed_shapes"
_PACKED_HINT = "the packed checkpoint was not written by bitcpm or is damaged"


def packed_base(name: str) -> str | None:
    """The linear a packed tensor belongs to (`X` of `X.weight_packed` / `X.weight_scale`), else None."""
    for suffix in (PACKED_SUFFIX, SCALE_SUFFIX):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return None


def read_packed_shapes(files: WeightFiles, specs: dict[str, TensorSpec]) -> dict[str, list[int]]:
    """The [out, in] shape of every packed linear, from the safetensors metadata bitcpm writes, each checked
    against the packed codes and scales it describes."""
    shapes: dict[str, list[int]] = {}
    for file in files.files:
        if files.format == "safetensors":
            raw = safetensors_metadata(file).get(PACKED_SHAPES_KEY, "{}")
            recorded = parse_json(raw, f"{file} metadata {PACKED_SHAPES_KEY}", "packed metadata")
            if not isinstance(recorded, dict):
                raise InputError(f"{PACKED_SHAPES_KEY} metadata must map layer names to [out, in] ({file})",
                                 hint=_PACKED_HINT)
            shapes.update(recorded)
    missing = [n for n in specs if n.endswith(PACKED_SUFFIX) and packed_base(n) not in shapes]
    if missing:
        raise InputError(f"packed tensor {missing[0]} has no recorded shape ({PACKED_SHAPES_KEY} metadata)",
                         hint=_PACKED_HINT)
    for base, shape in shapes.items():
        problem = _packed_problem(base, shape, specs)
        if problem:
            raise InputError(f"packed layer {base[:80]!r}: {problem} ({PACKED_SHAPES_KEY} metadata)",
                             hint=_PACKED_HINT)
    return shapes


def _packed_problem(base: str, shape: Any, specs: dict[str, TensorSpec]) -> str | None:
    if not (isinstance(shape, list) and len(shape) == 2
            and all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)):
        return f"recorded shape {str(shape)[:60]} is not [out, in] with positive integers"
    codes, scales = specs.get(base + PACKED_SUFFIX), specs.get(base + SCALE_SUFFIX)
    if codes is None or scales is None:
        return "the packed codes or the scales are missing"
    out_features, in_features = shape
    if codes.dtype != "uint8" or codes.shape != (out_features, math.ceil(in_features / 4)):
        return f"codes {codes.dtype} {list(codes.shape)} do not hold a {shape} weight"
    rows, groups = scales.shape if len(scales.shape) == 2 else (0, 0)
    if rows not in (1, out_features) or groups < 1 or in_features % groups or (rows == 1 and groups != 1):
        return f"scales of shape {list(scales.shape)} do not fit a {shape} weight"
    return None


def unpack_weight(packed: torch.Tensor, scales: torch.Tensor, shape: list[int] | tuple[int, int],
                  dtype: torch.dtype) -> torch.Tensor:
    """The fused weight of a packed linear: codes * scale per group, in float32, cast once."""
    codes = unpack_ternary(packed, shape[1])
    return Quantized(codes, scales.to(torch.float32), group_size=0).dequantize(dtype)


class PackedPairs:
    """Turns a stream of packed-checkpoint tensors into fused ones: a linear's codes and scales (in either order)
    become its `.weight` in `dtype` once both are in; every other floating tensor is cast to `dtype`."""

    def __init__(self, shapes: dict[str, list[int]], dtype: torch.dtype):
        self.shapes, self.dtype = shapes, dtype
        self._pending: dict[str, dict[str, torch.Tensor]] = {}

    def add(self, name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        base = packed_base(name)
        if base is None:
            return [(name, tensor.to(self.dtype) if tensor.is_floating_point() else tensor)]
        pending = self._pending.setdefault(base, {})
        pending[name] = tensor
        if len(pending) < 2:
            return []
        del self._pending[base]
        scales = pending[base + SCALE_SUFFIX]
        if scales.is_floating_point() and not bool(torch.isfinite(scales).all()):
            raise InputError(f"packed layer {base[:80]!r} has NaN or infinite scales", hint=_PACKED_HINT)
        return [(base + ".weight", unpack_weight(pending[base + PACKED_SUFFIX], scales, self.shapes[base],
                                                 self.dtype))]


def unpacked_state_dict(files: WeightFiles, specs: dict[str, TensorSpec], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A packed checkpoint as a fused state dict in `dtype` (exactly what `convert --format fused` writes)."""
    pairs = PackedPairs(read_packed_shapes(files, specs), dtype)
    state: dict[str, torch.Tensor] = {}
    for name, tensor in iter_tensors(files):
        state.update(pairs.add(name, tensor))
    return state

# ---- GGUF --------------------------------------------------------------------------------------------------------
GGUF_ALIGNMENT = 32
# ggml type ids, block length and block bytes of the types bitcpm writes
GGUF_BLOCKS = {"TQ2_0": (35, 256, 66), "TQ1_0": (34, 256, 54), "Q4_0": (2, 32, 18), "Q8_0": (8, 32, 34),
               "F16": (1, 1, 2), "BF16": (30, 1, 2), "F32": (0, 1, 4)}
# general.file_type (llama.cpp's LLAMA_FTYPE_MOSTLY_*) named after the type of most quantized weights
GGUF_FILE_TYPES = {"TQ1_0": 36, "TQ2_0": 37, "Q4_0": 2, "Q8_0": 7, "F16": 1, "BF16": 32}
FILE_TYPE_NAMES = {v: k.lower() for k, v in GGUF_FILE_TYPES.items()}
_SHIFTS = torch.tensor([0, 2, 4, 6], dtype=torch.uint8)


def gguf_nbytes(type_name: str, numel: int) -> int:
    _, block, size = GGUF_BLOCKS[type_name]
    return numel // block * size


def _fp16_bytes(d: torch.Tensor) -> torch.Tensor:
    return d.to(torch.float16).contiguous().view(torch.uint8).reshape(-1, 2)


def _in_row_blocks(weight: torch.Tensor, type_name: str):
    """(rows of the weight, the matching rows of its encoded blocks) a cache-sized block of rows at a time."""
    _, block, _ = GGUF_BLOCKS[type_name]
    per_row = weight.shape[1] // block if weight.ndim == 2 else 0
    with row_blocks(weight if per_row else weight.reshape(1, -1)) as blocks:
        for rows in blocks:
            yield (weight[rows], slice(rows.start * per_row, rows.stop * per_row)) if per_row else (weight, slice(None))


def encode_block_type(weight: torch.Tensor, type_name: str) -> torch.Tensor:
    """[rows, cols] -> uint8 [rows * cols / block, block bytes], for blocks whose values are exactly codes times one
    fp16 scale: TQ2_0 / Q4_0 take the block's largest magnitude as the scale and the signs as codes (a ternary
    block); Q8_0 its smallest non-zero magnitude and the rounded quotients (scales that are integer multiples of one
    fit). Other blocks come out wrong, which `reproduces` detects. Encoded a block of rows at a time (each GGUF
    block lies in one row), so the temporaries stay in cache."""
    _, block, size = GGUF_BLOCKS[type_name]
    encoded = torch.empty(weight.numel() // block, size, dtype=torch.uint8)
    for rows, blocks in _in_row_blocks(weight, type_name):
        encoded[blocks] = _encode_blocks(rows, type_name)
    return encoded


def _encode_blocks(weight: torch.Tensor, type_name: str) -> torch.Tensor:
    _, block, _ = GGUF_BLOCKS[type_name]
    blocks = weight.reshape(-1, block)
    magnitudes = blocks.abs()
    if type_name == "Q8_0":
        d = torch.where(magnitudes > 0, magnitudes, torch.full_like(magnitudes, torch.inf)).amin(-1)
        d = torch.where(torch.isinf(d), torch.zeros_like(d), d).to(torch.float16)
        safe = torch.where(d > 0, d, torch.ones_like(d)).to(torch.float32).unsqueeze(-1)
        q = torch.round(blocks.to(torch.float32) / safe).clamp_(-127, 127).to(torch.int8).view(torch.uint8)
        return torch.cat([_fp16_bytes(d), q], dim=1)
    d = magnitudes.amax(-1).to(torch.float16)
    signs = torch.sign(blocks).to(torch.int8)
    if type_name == "TQ2_0":
        q = (signs + 1).view(torch.uint8).reshape(-1, 2, 4, 32)
        packed = q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)
        return torch.cat([packed.reshape(-1, 64), _fp16_bytes(d)], dim=1)
    if type_name == "Q4_0":
        q = (signs + 8).view(torch.uint8)
        return torch.cat([_fp16_bytes(d), q[:, :16] | (q[:, 16:] << 4)], dim=1)
    raise ValueError(f"no torch encoder for {type_name}")


def _block_codes(raw: torch.Tensor, type_name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 codes [blocks, block] (value = code * d) and the fp16 scales d [blocks] of encoded blocks."""
    if type_name == "TQ2_0":
        q = (raw[:, :64].reshape(-1, 2, 1, 32) >> _SHIFTS.reshape(1, 1, 4, 1)) & 3
        return q.reshape(-1, 256).view(torch.int8) - 1, raw[:, 64:].contiguous().view(torch.float16).reshape(-1)
    if type_name == "Q4_0":
        qs = raw[:, 2:]
        return (torch.cat([qs & 15, qs >> 4], dim=1).view(torch.int8) - 8,
                raw[:, :2].contiguous().view(torch.float16).reshape(-1))
    if type_name == "Q8_0":
        return raw[:, 2:].contiguous().view(torch.int8), raw[:, :2].contiguous().view(torch.float16).reshape(-1)
    raise ValueError(f"no torch decoder for {type_name}")


def decode_block_type(raw: torch.Tensor, type_name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """uint8 blocks -> float32 values in `shape`, as ggml dequantizes them (code * fp16 scale, in float32)."""
    codes, d = _block_codes(raw, type_name)
    return (codes.to(torch.float32) * d.to(torch.float32).unsqueeze(-1)).reshape(shape)


def reproduces(raw: torch.Tensor, type_name: str, weight: torch.Tensor) -> bool:
    """Whether the encoded blocks dequantize (code * d in float32) to `weight` exactly, checked a block of rows at a
    time (the first block that differs ends it)."""
    with closing(_in_row_blocks(weight, type_name)) as pieces:
        return all(_reproduces(raw[blocks], type_name, rows) for rows, blocks in pieces)


def _reproduces(raw: torch.Tensor, type_name: str, weight: torch.Tensor) -> bool:
    """Computed in the weight's dtype (half the memory traffic for bf16) when every code is in {-2..2} and every
    scale converts to that dtype without rounding: code * d is then exact in both; otherwise in float32."""
    codes, d = _block_codes(raw, type_name)
    scale = d.to(weight.dtype)
    if not torch.equal(scale.to(torch.float32), d.to(torch.float32)):
        return False
    _, block, _ = GGUF_BLOCKS[type_name]
    if type_name != "Q8_0" and bool((codes.abs() <= 2).all()):  # code * d is exact in any binary float dtype
        return torch.equal(codes.to(weight.dtype) * scale.unsqueeze(-1), weight.reshape(-1, block))
    return torch.equal(decode_block_type(raw, type_name, weight.shape), weight.to(torch.float32))


# ---- fingerprints ------------------------------------------------------------------------------------------------
def sha256_file(path: str | Path, digest: "hashlib._Hash | None" = None) -> str:
    """`sha256:<hex>` of a file's bytes (fed into `digest` when given, to hash several files in order)."""
    digest = digest or hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(2**24), b""):
            digest.update(block)
    return f"sha256:{digest.hexdigest()}"


def fingerprint(files: WeightFiles) -> str:
    """`sha256:<hex>` over the bytes of every weight file of a checkpoint, in order (what `convert` records as its
    input's fingerprint, computed while it reads)."""
    digest = hashlib.sha256()
    for file in files.files:
        sha256_file(file, digest)
    return f"sha256:{digest.hexdigest()}"
