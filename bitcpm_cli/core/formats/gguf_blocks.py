"""The GGUF block types used for ternary weights, defined once (encoders and decoders); GGUF export writes them and its
read-back checks them.

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

from contextlib import closing

import torch

from bitcpm_cli.core.quant import row_blocks

# ---- GGUF --------------------------------------------------------------------------------------------------------
GGUF_ALIGNMENT = 32


# ggml type ids, block length and block bytes of the types bitcpm writes
GGUF_BLOCKS = {"TQ2_0": (35, 256, 66), "TQ1_0": (34, 256, 54), "Q4_0": (2, 32, 18), "Q8_0": (8, 32, 34),
               "F16": (1, 1, 2), "BF16": (30, 1, 2), "F32": (0, 1, 4)}


# The activations llama.cpp quantizes a matrix's input to before multiplying it by blocks of each type (its CPU
# backend's `vec_dot_type` on x86: ggml/src/ggml-cpu/ggml-cpu.c, `type_traits_cpu`), as bitcpm's activation schemes
# name them (quant/activations.py computes q8_k and q8_0); F16 / BF16 weights multiply activations converted to their
# type, F32 ones full-precision activations.
GGUF_ACTIVATIONS = {"TQ1_0": "q8_k", "TQ2_0": "q8_k", "Q2_K": "q8_k", "Q3_K": "q8_k", "Q4_K": "q8_k", "Q5_K": "q8_k",
                    "Q6_K": "q8_k", "Q4_0": "q8_0", "Q5_0": "q8_0", "Q8_0": "q8_0", "Q4_1": "q8_1", "Q5_1": "q8_1",
                    "F16": "f16", "BF16": "bf16", "F32": "none"}


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
