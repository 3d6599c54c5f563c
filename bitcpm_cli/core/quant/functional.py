"""The quantizer: the single definition (README, "Quantization semantics") that every command uses.

Groups run along the input dimension of a weight W[out, in]:
  group_size -1: one group per output row; 0: one group per tensor; N > 0: N consecutive input channels.
Scale arithmetic runs in float32; the fused weight is cast once to the output dtype.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Iterator

import torch

from bitcpm_cli.core.errors import QuantError
from bitcpm_cli.core.quant.scheme import LayerQuant

TERNARY_EPS = 1e-5
# The tensor name of a learned scale in a QAT checkpoint: `<module>.quant_alpha` (float32 [rows, groups]) beside
# `<module>.weight` (the CANN Kit's name for the quantizer's trained scale).
SCALE_PARAM = "quant_alpha"


def check_groupable(shape: tuple[int, ...] | torch.Size, group_size: int, name: str = "weight") -> None:
    """Raise a QuantError naming the layer if `group_size` cannot split this weight's rows."""
    if len(shape) != 2:
        raise QuantError(f"{name}: expected a 2-D weight [out, in], got shape {tuple(shape)}",
                         hint="only linear weights are quantized; add the module to modules_to_not_convert")
    if group_size > 0 and shape[1] % group_size != 0:
        divisors = [g for g in (32, 64, 128, 256) if shape[1] % g == 0]
        raise QuantError(
            f"{name}: group_size {group_size} does not divide in_features {shape[1]}",
            hint="use group_size -1 (per row), 0 (per tensor)"
                 + (f" or one of {divisors}" if divisors else "")
                 + ", or a per-layer override for this module",
        )


def _grouped(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    """float32 view [rows, groups, group_len] of a 2-D weight."""
    out_features, in_features = weight.shape
    w = weight.detach().to(torch.float32) if weight.dtype != torch.float32 else weight.detach()
    if group_size == -1:
        return w.reshape(out_features, 1, in_features)
    if group_size == 0:
        return w.reshape(1, 1, out_features * in_features)
    return w.reshape(out_features, in_features // group_size, group_size)


@dataclass
class Quantized:
    """Integer codes [out, in] (int8) and float32 scales [rows, groups] of one weight."""

    codes: torch.Tensor
    scales: torch.Tensor
    group_size: int

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        grouped = self.codes.to(torch.float32).reshape(self.scales.shape[0], self.scales.shape[1], -1)
        return (grouped * self.scales.unsqueeze(-1)).reshape(self.codes.shape).to(dtype)


def _ternary(w: torch.Tensor, abs_w: torch.Tensor, spec: LayerQuant) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes in {-1, 0, +1}, scale the mean |w| of the group (BitNet b1.58's absmean)."""
    scales = abs_w.mean(dim=-1, keepdim=True).clamp_min(TERNARY_EPS)
    return torch.div(w, scales, out=abs_w).round_().clamp_(-1, 1), scales  # in place: fewer temporaries


def _binary(w: torch.Tensor, abs_w: torch.Tensor, spec: LayerQuant) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes in {-1, +1} (the sign, 0 counted as +1), scale the mean |w| of the group."""
    return torch.where(w >= 0, 1.0, -1.0), abs_w.mean(dim=-1, keepdim=True)


def _integer(w: torch.Tensor, abs_w: torch.Tensor, spec: LayerQuant) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric intN (N = spec.bits): codes in [-2^(N-1), 2^(N-1) - 1], scale max |w| / (2^(N-1) - 1)."""
    qmax = 2 ** (spec.bits - 1) - 1
    scales = abs_w.amax(dim=-1, keepdim=True) / qmax
    # An all-zero group has scale 0: divide by 1 instead so its codes are 0 rather than NaN.
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    return torch.clamp(torch.round(w / safe), -qmax - 1, qmax), scales


# Every quant type that quantizes (scheme.QUANT_TYPES but "none"): grouped weight, its |w| (free to overwrite), the
# layer's spec -> float32 codes and scales. A new quant type is one function here and its name in QUANT_TYPES.
QUANTIZERS = {"ternary": _ternary, "binary": _binary, "int2": _integer, "int4": _integer, "int8": _integer}


def _learned_ternary(w: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Ternary codes against given (learned) scales [rows, groups]: `clamp(round(W_g / s), -1, 1)`, with `s` kept
    above the absmean floor. The same division, rounding and clamp as `_ternary`."""
    s = scales.detach().to(torch.float32).reshape(w.shape[0], w.shape[1], 1).clamp_min(TERNARY_EPS)
    return torch.div(w, s).round_().clamp_(-1, 1), s


def _codes_and_scales(weight: torch.Tensor, spec: LayerQuant, name: str,
                      scales: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 codes [rows, groups, group_len] and scales [rows, groups, 1]; with `scales` (a learned-scales layer's
    [rows, groups]), the codes are taken against them instead of computed ones."""
    check_groupable(weight.shape, spec.group_size, name)
    quantizer = QUANTIZERS.get(spec.quant_type)
    if quantizer is None:
        raise QuantError(f"{name}: quant_type {spec.quant_type!r} does not quantize", hint="skip this module")
    w = _grouped(weight, spec.group_size)
    if scales is not None:
        if spec.quant_type != "ternary":
            raise QuantError(f"{name}: quant_type {spec.quant_type!r} has no learned scale", hint="use ternary")
        expected = (w.shape[0], w.shape[1])
        if tuple(scales.shape) != expected:
            raise QuantError(f"{name}: learned scales of shape {tuple(scales.shape)} do not fit a weight "
                             f"{tuple(weight.shape)} at group_size {spec.group_size} (expected {expected})",
                             hint="the checkpoint's quant_alpha and bitcpm_quant disagree; convert it with the "
                                  "group_size it was trained with")
        return _learned_ternary(w, scales)
    if spec.learned:
        raise QuantError(f"{name}: this layer has learned scales, and none were given",
                         hint=f"the checkpoint is missing {name}.{SCALE_PARAM}")
    return quantizer(w, w.abs(), spec)


def absmean_scales(weight: torch.Tensor, spec: LayerQuant, name: str = "weight") -> torch.Tensor:
    """The scales [rows, groups] the quantizer computes from `weight` (absmean for ternary): a learned scale's
    initial value."""
    from dataclasses import replace

    return quantize(weight, replace(spec, learned=False), name).scales


# A CPU weight is quantized in blocks of whole rows of about this many elements, on one thread: the float32
# temporaries of a block stay in cache instead of streaming the whole tensor through memory once per operation (about
# 10x faster on a 1B model's MLP weights), and one thread has no OpenMP barrier after each small operation (with
# another multi-threaded process on the machine, those barriers made the blocks 100x slower than one pass). Every
# row's arithmetic is the same either way (each group's mean is reduced on its own), so the result is bit for bit
# that of one pass over the tensor; tests/unit/test_quant_functional.py holds this.
BLOCK_ELEMENTS = 1 << 18


_THREADS = threading.Lock()
_one_thread_users = 0
_threads_before = 0


@contextmanager
def _one_thread() -> Iterator[None]:
    """torch on one intra-op thread while any caller is inside (the setting is process-wide: callers on several
    threads share one save and one restore, so none restores another's 1)."""
    global _one_thread_users, _threads_before
    with _THREADS:
        if _one_thread_users == 0:
            _threads_before = torch.get_num_threads()
            torch.set_num_threads(1)
        _one_thread_users += 1
    try:
        yield
    finally:
        with _THREADS:
            _one_thread_users -= 1
            if _one_thread_users == 0:
                torch.set_num_threads(_threads_before)


def _row_blocks(weight: torch.Tensor, group_size: int) -> list[slice]:
    """Row ranges to quantize one at a time: one block for a per-tensor group, an accelerator, a small weight or a
    non-contiguous one (a strided reduction sums in an order that depends on the rows it is given)."""
    rows = weight.shape[0]
    per_block = max(16, BLOCK_ELEMENTS // max(weight.shape[1], 1) // 16 * 16)  # >= 16 rows: many groups per block
    if group_size == 0 or weight.device.type != "cpu" or not weight.is_contiguous() or rows <= per_block:
        return [slice(0, rows)]
    return [slice(start, min(start + per_block, rows)) for start in range(0, rows, per_block)]


@contextmanager
def row_blocks(weight: torch.Tensor, group_size: int = -1) -> Iterator[list[slice]]:
    """The row ranges to work through a weight in, a block at a time (see above), with torch on one thread
    meanwhile when they are several. Any computation whose rows are independent gives the one-pass result."""
    blocks = _row_blocks(weight, group_size)
    with _one_thread() if len(blocks) > 1 else nullcontext():
        yield blocks


def _require_finite(scales: torch.Tensor, name: str) -> None:
    """A NaN or an infinity anywhere in a group makes its scale non-finite: checking the scales checks the weight."""
    if not bool(torch.isfinite(scales).all()):
        raise QuantError(f"{name}: the weight holds NaN or infinite values; its fused weight would be NaN",
                         hint="the checkpoint is damaged or training diverged: convert an earlier checkpoint")


def _blocks(weight: torch.Tensor, spec: LayerQuant, name: str, finite: bool, scales: torch.Tensor | None = None
            ) -> Iterator[tuple[slice, torch.Tensor, torch.Tensor]]:
    """(rows, float32 codes, scales) of each block of rows (one block, on torch's threads, unless blocks pay)."""
    with row_blocks(weight, spec.group_size) as blocks:
        for block in blocks:
            given = None if scales is None else scales if len(blocks) == 1 else scales[block]
            codes, scales_block = _codes_and_scales(weight[block], spec, name, given)
            if finite:
                _require_finite(scales_block, name)
            yield block, codes, scales_block


def quantize(weight: torch.Tensor, spec: LayerQuant, name: str = "weight", finite: bool = False,
             scales: torch.Tensor | None = None) -> Quantized:
    """Codes and scales of `weight` under `spec` (README, "Quantization semantics"); with `finite`, a weight holding
    NaN or infinity is a QuantError naming `name`. `scales` ([rows, groups]) are a learned-scales layer's: the codes
    are taken against them, and the returned scales are them (above the floor)."""
    check_groupable(weight.shape, spec.group_size, name)
    given = scales
    codes = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
    scales = torch.empty(scale_shape(weight.shape, spec.group_size), dtype=torch.float32, device=weight.device)
    for block, block_codes, block_scales in _blocks(weight, spec, name, finite, given):
        codes[block] = block_codes.reshape(codes[block].shape)
        scales[block] = block_scales.reshape(scales[block].shape)
    return Quantized(codes, scales, spec.group_size)


def fake_quantize(weight: torch.Tensor, spec: LayerQuant, dtype: torch.dtype | None = None,
                  name: str = "weight", finite: bool = False, scales: torch.Tensor | None = None) -> torch.Tensor:
    """The fused weight `q * s`, computed in float32 and cast once to `dtype` (default: the weight's dtype); with
    `finite`, a weight holding NaN or infinity is a QuantError naming `name`; `scales`: a learned-scales layer's.

    A code of zero gives +0.0 (never -0.0, which rounding a small negative weight would give), so the fused weight
    is byte for byte what unpacking its integer codes gives.
    """
    if not spec.enabled:
        return weight if dtype is None else weight.to(dtype)
    check_groupable(weight.shape, spec.group_size, name)
    fused = torch.empty(weight.shape, dtype=dtype or weight.dtype, device=weight.device)
    for block, codes, block_scales in _blocks(weight, spec, name, finite, scales):
        fused[block] = codes.add_(0.0).mul_(block_scales).reshape(fused[block].shape)  # cast once, on assignment
    return fused


def scale_shape(shape: tuple[int, ...] | torch.Size, group_size: int) -> tuple[int, int]:
    """[rows, groups] of the scales of a weight [out, in]."""
    out_features, in_features = shape
    if group_size == 0:
        return 1, 1
    return out_features, 1 if group_size == -1 else in_features // group_size


# Group sizes an already fused weight is recognised at (per tensor, per row, then the common group sizes).
FUSED_GROUP_CANDIDATES = (0, -1, 256, 128, 64, 32)


def fused_scales(weight: torch.Tensor, group_size: int) -> torch.Tensor | None:
    """Scales `a = max|W_g|` if every group already holds at most {-a, 0, +a} (a fused weight), else None."""
    if weight.ndim != 2 or (group_size > 0 and weight.shape[1] % group_size):
        return None
    abs_w = _grouped(weight, group_size).abs()
    scales = abs_w.amax(dim=-1, keepdim=True)
    if not bool(((abs_w == 0) | (abs_w == scales)).all()):
        return None
    return scales.squeeze(-1)


def ternary_codes_from_fused(weight: torch.Tensor, group_size: int) -> Quantized | None:
    """Recover exact ternary codes and scales from an already fused weight (no re-quantization)."""
    scales = fused_scales(weight, group_size)
    if scales is None:
        return None
    codes = torch.sign(_grouped(weight, group_size)).to(torch.int8).reshape(weight.shape)
    return Quantized(codes, scales, group_size)
