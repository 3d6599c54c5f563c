"""What `convert` reports: the result of a checkpoint conversion (with --verify, its verification report) and the
result of a GGUF export.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any


@dataclass
class VerifyReport:
    tensors_checked: int = 0
    mismatches: list[str] = field(default_factory=list)
    not_ternary: list[str] = field(default_factory=list)
    zero_fraction: dict[str, float] = field(default_factory=dict)  # per quantized tensor

    @property
    def ok(self) -> bool:
        return not self.mismatches and not self.not_ternary

    def per_layer(self) -> dict[str, float]:
        """Zero fraction of the quantized weights of each decoder layer (numel-weighted)."""
        layers: dict[str, list[float]] = {}
        for name, fraction in self.zero_fraction.items():
            match = re.search(r"layers\.(\d+)\.", name)
            layers.setdefault(match.group(1) if match else name, []).append(fraction)
        return {k: sum(v) / len(v) for k, v in sorted(layers.items(), key=lambda kv: (not kv[0].isdigit(),
                                                                                       int(kv[0]) if kv[0].isdigit() else 0, kv[0]))}


@dataclass
class ConvertResult:
    input: str
    output: str
    format: str
    dtype: str
    input_kind: str  # "qat" | "float" | "fused" | "packed"
    scheme: dict[str, Any] | None
    tensors_in: int
    tensors_quantized: int
    bytes_in: int
    bytes_out: int
    quantized_bytes_out: int  # the quantized linears as written (packed codes + scales, or fused tensors)
    quantized_numel: int
    fingerprint: str
    seconds: float
    shards: int
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    verify: VerifyReport | None = None
    # how many quantized linears quantize their input with each activation scheme (none left out)
    activations: dict[str, int] = field(default_factory=dict)

    @property
    def linear_ratio_vs_bf16(self) -> float:
        """How many times smaller the quantized linears are than the same weights in bf16."""
        return (2 * self.quantized_numel) / self.quantized_bytes_out if self.quantized_bytes_out else 0.0

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k != "verify"}
        out["linear_ratio_vs_bf16"] = round(self.linear_ratio_vs_bf16, 3)
        if self.verify is not None:
            out["verify"] = {"ok": self.verify.ok, "tensors_checked": self.verify.tensors_checked,
                             "mismatches": self.verify.mismatches, "not_ternary": self.verify.not_ternary,
                             "zero_fraction_per_layer": self.verify.per_layer()}
        return out


@dataclass
class GgufResult:
    output: str
    gguf_type: str
    tensors: int
    ternary_tensors: int  # quantized linears (ternary codes in TQ / Q4_0 / Q8_0 blocks)
    bytes_out: int
    seconds: float
    architecture: str = "llama"
    tensor_types: dict[str, int] = field(default_factory=dict)  # ggml type -> number of tensors
    bits_per_weight: float = 0.0  # of the whole file, over every weight
    linear_bits_per_weight: float = 0.0  # of the quantized linears
    max_abs_error: float = 0.0  # over the quantized linears, decoded as written
    exact: bool = True
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)
