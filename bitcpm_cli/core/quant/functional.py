"""The quantizer: the single definition (README, "Quantization semantics") that every command uses.

Groups run along the input dimension of a weight W[out, in]:
  group_size -1: one group per output row; 0: one group per tensor; N > 0: N consecutive input channels.
Scale arithmetic runs in float32; the fused weight is cast once to the output dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bitcpm_cli.core.errors import QuantError
from bitcpm_cli.core.quant.scheme import LayerQuant

TERNARY_EPS = 1e-5


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


def _codes_and_scales(weight: torch.Tensor, spec: LayerQuant, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 codes [rows, groups, group_len] and scales [rows, groups, 1]."""
    check_groupable(weight.shape, spec.group_size, name)
    w = _grouped(weight, spec.group_size)
    abs_w = w.abs()
    if spec.quant_type == "ternary":
        scales = abs_w.mean(dim=-1, keepdim=True).clamp_min(TERNARY_EPS)
        return torch.clamp(torch.round(w / scales), -1, 1), scales
    if spec.quant_type == "binary":
        return torch.where(w >= 0, 1.0, -1.0), abs_w.mean(dim=-1, keepdim=True)
    if spec.bits is not None:
        qmax = 2 ** (spec.bits - 1) - 1
        scales = abs_w.amax(dim=-1, keepdim=True) / qmax
        # An all-zero group has scale 0: divide by 1 instead so its codes are 0 rather than NaN.
        safe = torch.where(scales > 0, scales, torch.ones_like(scales))
        return torch.clamp(torch.round(w / safe), -qmax - 1, qmax), scales
    raise QuantError(f"{name}: quant_type {spec.quant_type!r} does not quantize", hint="skip this module")


def quantize(weight: torch.Tensor, spec: LayerQuant, name: str = "weight") -> Quantized:
    """Codes and scales of `weight` under `spec` (README, "Quantization semantics")."""
    codes, scales = _codes_and_scales(weight, spec, name)
    return Quantized(codes.to(torch.int8).reshape(weight.shape), scales.squeeze(-1), spec.group_size)


def fake_quantize(weight: torch.Tensor, spec: LayerQuant, dtype: torch.dtype | None = None,
                  name: str = "weight") -> torch.Tensor:
    """The fused weight `q * s`, computed in float32 and cast once to `dtype` (default: the weight's dtype).

    A code of zero gives +0.0 (never -0.0, which rounding a small negative weight would give), so the fused weight
    is byte for byte what unpacking its integer codes gives.
    """
    if not spec.enabled:
        return weight if dtype is None else weight.to(dtype)
    codes, scales = _codes_and_scales(weight, spec, name)
    return (codes.add_(0.0) * scales).reshape(weight.shape).to(dtype or weight.dtype)


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
