"""The on-disk formats bitcpm writes and reads, defined once: the packed checkpoint's names, the GGUF block types
used for ternary weights (encoders and decoders), and the sha256 fingerprint of a file.

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
from pathlib import Path

import torch

# ---- the packed checkpoint (convert --format packed) ------------------------------------------------------------
PACKED_SUFFIX, SCALE_SUFFIX = ".weight_packed", ".weight_scale"
PACKED_SHAPES_KEY = "bitcpm.packed_shapes"

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


def _scales(raw: torch.Tensor) -> torch.Tensor:
    return raw.contiguous().view(torch.float16).reshape(-1).to(torch.float32)


def _codes(blocks: torch.Tensor, d: torch.Tensor, low: int, high: int) -> torch.Tensor:
    safe = torch.where(d > 0, d, torch.ones_like(d)).unsqueeze(-1)
    return torch.round(blocks / safe).clamp_(low, high).to(torch.int16)


def encode_block_type(weight: torch.Tensor, type_name: str) -> torch.Tensor:
    """float32 [rows, cols] -> uint8 [rows * cols / block, block bytes] (scale = the block's largest magnitude for
    TQ2_0 / Q4_0, its smallest non-zero magnitude for Q8_0, so that several scales that are integer multiples of
    one fit)."""
    _, block, _ = GGUF_BLOCKS[type_name]
    blocks = weight.reshape(-1, block)
    magnitudes = blocks.abs()
    if type_name == "Q8_0":
        d = torch.where(magnitudes > 0, magnitudes, torch.full_like(magnitudes, torch.inf)).amin(-1)
        d = torch.where(torch.isinf(d), torch.zeros_like(d), d)
    else:
        d = magnitudes.amax(-1)
    d16 = d.to(torch.float16).to(torch.float32)
    if type_name == "TQ2_0":
        q = (_codes(blocks, d16, -1, 1) + 1).to(torch.uint8).reshape(-1, 2, 4, 32)
        packed = (q << _SHIFTS.reshape(1, 1, 4, 1)).sum(dim=2, dtype=torch.uint8).reshape(-1, 64)
        return torch.cat([packed, _fp16_bytes(d16)], dim=1)
    if type_name == "Q4_0":
        q = (_codes(blocks, d16, -8, 7) + 8).to(torch.uint8)
        return torch.cat([_fp16_bytes(d16), q[:, :16] | (q[:, 16:] << 4)], dim=1)
    if type_name == "Q8_0":
        q = _codes(blocks, d16, -127, 127).to(torch.int8).view(torch.uint8)
        return torch.cat([_fp16_bytes(d16), q], dim=1)
    raise ValueError(f"no torch encoder for {type_name}")


def decode_block_type(raw: torch.Tensor, type_name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """uint8 blocks -> float32 values in `shape`, as ggml dequantizes them."""
    if type_name == "TQ2_0":
        q = (raw[:, :64].reshape(-1, 2, 1, 32) >> _SHIFTS.reshape(1, 1, 4, 1)) & 3
        values = (q.reshape(-1, 256).to(torch.float32) - 1) * _scales(raw[:, 64:]).unsqueeze(-1)
    elif type_name == "Q4_0":
        qs = raw[:, 2:]
        q = torch.cat([qs & 15, qs >> 4], dim=1).to(torch.float32) - 8
        values = q * _scales(raw[:, :2]).unsqueeze(-1)
    elif type_name == "Q8_0":
        values = raw[:, 2:].contiguous().view(torch.int8).to(torch.float32) * _scales(raw[:, :2]).unsqueeze(-1)
    else:
        raise ValueError(f"no torch decoder for {type_name}")
    return values.reshape(shape)


# ---- fingerprints ------------------------------------------------------------------------------------------------
def sha256_file(path: str | Path, digest: "hashlib._Hash | None" = None) -> str:
    """`sha256:<hex>` of a file's bytes (fed into `digest` when given, to hash several files in order)."""
    digest = digest or hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(2**24), b""):
            digest.update(block)
    return f"sha256:{digest.hexdigest()}"
