"""Quantization: schemes, the fake quantizer (STE), QAT modules, fusion and 2-bit packing."""

from bitcpm_cli.core.quant.functional import (
    FUSED_GROUP_CANDIDATES,
    SCALE_PARAM,
    Quantized,
    absmean_scales,
    fake_quantize,
    fused_scales,
    quantize,
    row_blocks,
    scale_shape,
    ternary_codes_from_fused,
)
from bitcpm_cli.core.quant.packing import pack_ternary, unpack_ternary
from bitcpm_cli.core.quant.qat import (
    QATLinear,
    fuse,
    learned_scale_params,
    plan,
    plan_state_dict,
    prepare,
    qat_layers,
    release_fused,
)
from bitcpm_cli.core.quant.scheme import LayerQuant, QuantScheme, load_scheme_file

__all__ = [
    "FUSED_GROUP_CANDIDATES", "SCALE_PARAM", "LayerQuant", "QATLinear", "QuantScheme", "Quantized", "absmean_scales",
    "fake_quantize", "fuse", "learned_scale_params",
    "fused_scales", "load_scheme_file", "pack_ternary", "plan", "plan_state_dict", "prepare", "qat_layers", "quantize",
    "release_fused", "row_blocks", "scale_shape", "ternary_codes_from_fused", "unpack_ternary",
]
