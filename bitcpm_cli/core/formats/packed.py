"""The packed checkpoint (2-bit ternary codes + scales): its tensor names, the packed shapes recorded in the
safetensors metadata, and its reader (pairs of codes and scales unpacked to weights). `convert` writes it; `infer`,
`eval` and `convert` (unpacking) read it through here.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from bitcpm_cli.core.errors import InputError
from bitcpm_cli.core.io.readers import parse_json
from bitcpm_cli.core.io.safetensors import safetensors_metadata
from bitcpm_cli.core.model.checkpoint import TensorSpec, WeightFiles, iter_tensors
from bitcpm_cli.core.quant import Quantized, unpack_ternary

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
