"""Fuzz the activation quantizers and the `activations` settings of a quantization scheme.

Quantizers, on random shapes (batch x seq x hidden) and values (subnormal, huge, exact halves, ties, zeros): the codes
stay in [-128, 127] (int8-token) or [-127, 127] (q8_k; q8_0 outside its vanishing blocks), each code is the nearest
integer to the scaled value, the dequantized value is within half a step of the input, and everything equals the
float32 transcriptions of the reference code in tests/unit/test_activations.py bit for bit.

Schemes: whatever `activations` holds, at the top level or under `layers`, `QuantScheme.from_dict` returns a scheme
or raises a ConfigError naming the field, never another exception. Bounded: no deadline, few examples (2-core CI).
"""

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bitcpm_cli.core.errors import ConfigError
from bitcpm_cli.core.quant import QuantScheme
from bitcpm_cli.core.quant.activations import activation_codes, dequantized
from bitcpm_cli.core.quant.scheme import ACTIVATION_SCHEMES
from tests.unit.test_activations import assert_matches_reference

FAST = settings(max_examples=40, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
BLOCK = {"int8-token": None, "q8_k": 256, "q8_0": 32}
FLT_MAX = float(np.finfo(np.float32).max)


@st.composite
def activations(draw, scheme: str) -> torch.Tensor:
    """A float32 [batch, seq, hidden] tensor: random values at one magnitude (2**-149 .. 2**127), with blocks of
    exact halves of a power-of-two step, zeros, ties of |max| and hand-picked extremes dropped in."""
    hidden = draw(st.sampled_from([256, 512] if scheme == "q8_k" else [32, 64, 96, 256] if scheme == "q8_0"
                                  else [1, 7, 32, 100]))
    shape = (draw(st.integers(1, 2)), draw(st.integers(1, 3)), hidden)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    exponent = draw(st.integers(-149, 127))
    values = np.clip(rng.standard_normal(shape) * 2.0**exponent, -FLT_MAX, FLT_MAX).astype(np.float32)
    values = values.reshape(-1, hidden)
    if draw(st.booleans()):  # a row of exact halves (n + 0.5) * 2**-k around a max of 127 * 2**-k
        k = draw(st.integers(-100, 120))
        row = draw(st.integers(0, len(values) - 1))
        values[row] = ((rng.integers(-127, 127, hidden) + 0.5) * 2.0**-k).astype(np.float32)
        values[row, rng.integers(0, hidden)] = draw(st.sampled_from([-127.0, 127.0])) * 2.0**-k
    extremes = st.one_of(st.floats(width=32, allow_nan=False, allow_infinity=False),
                         st.sampled_from([0.0, -0.0, 1e-45, -1e-45, 1.1754942e-38, FLT_MAX, -FLT_MAX]))
    flat = values.reshape(-1)
    for _ in range(draw(st.integers(0, 6))):
        flat[draw(st.integers(0, flat.size - 1))] = draw(extremes)
    if draw(st.booleans()):  # |max| repeated with the other sign later in the row
        row = values[draw(st.integers(0, len(values) - 1))]
        row[-1] = -row[np.abs(row).argmax()]
    return torch.from_numpy(values.reshape(shape))


def _half_step_holds(x: torch.Tensor, scheme: str) -> None:
    """Codes in range; the dequantized value within half a step of x (the step: 1/scale for int8-token, |d| for q8_k,
    amax/127 for q8_0 plus its fp16 rounding times the code). A value is non-finite only where the step times 127
    leaves float32 (a block or token at the very top of the range) or q8_0's fp16 d overflows. Blocks so small that
    127/max overflows (|max| < 127/FLT_MAX) are all zero codes in ggml: their error is |x| itself."""
    codes, multiplier = activation_codes(x, scheme)
    out = dequantized(x, scheme).double()
    block = BLOCK[scheme] or x.shape[-1]
    grouped = x.double().reshape(*x.shape[:-1], -1, block)
    grouped_codes = codes.double().reshape(grouped.shape)
    if scheme == "int8-token":
        assert grouped_codes.min() >= -128 and grouped_codes.max() <= 127
        step = 1.0 / multiplier.double().unsqueeze(-1)
    elif scheme == "q8_k":  # a block whose -127/max overflows is flushed to zero (codes 0, d 0), as ggml does
        assert grouped_codes.abs().max() <= 127
        amax = grouped.abs().amax(-1, keepdim=True)
        vanishing = (torch.full_like(amax, 127.0).float() / amax.float()).isinf() & (amax > 0)
        assert (grouped_codes == 0).logical_or(~vanishing).all() and (amax < 127 / FLT_MAX)[vanishing].all()
        step = torch.where(vanishing, 2 * amax, multiplier.double().abs().unsqueeze(-1))
    else:  # q8_0: codes -128 only in a block whose 127/amax overflows (d = 0 there)
        amax = grouped.abs().amax(-1, keepdim=True)
        vanishing = (torch.full_like(amax, 127.0).float() / amax.float()).isinf() & (amax > 0)
        assert (grouped_codes.abs() <= 127).logical_or(vanishing).all()
        assert (grouped_codes[vanishing.expand_as(grouped_codes)] == -128).all()
        d = multiplier.double().unsqueeze(-1)
        step = amax / 127 + 2 * grouped_codes.abs() * (d - amax / 127).abs()
        step = torch.where(d.isinf(), torch.inf, step)
    out = out.reshape(grouped.shape)
    finite = out.isfinite()
    assert (finite | (step * 127 >= FLT_MAX)).all()
    error = (grouped - out).abs()
    assert (error <= 0.5 * step * (1 + 1e-4) + 1e-40)[finite].all()


@pytest.mark.parametrize("scheme", ["int8-token", "q8_k", "q8_0"])
def test_quantizers_on_random_activations(scheme):
    @FAST
    @given(activations(scheme))
    def check(x):
        assert_matches_reference(x, scheme)
        if x.to(torch.bfloat16).isfinite().all():  # bf16 rounds the largest float32 values up to infinity
            assert_matches_reference(x.to(torch.bfloat16), scheme)
        _half_step_holds(x, scheme)

    check()


# ---- hostile `activations` settings ----------------------------------------------------------------------------------
hostile = st.one_of(
    st.sampled_from(["Q8_K", "q8_K", "int8", "int8_token", "q4_0", "q8_1", " none", "", "None", "q8-k", "fp16"]),
    st.text(max_size=8), st.integers(), st.floats(allow_nan=True), st.booleans(), st.none(),
    st.lists(st.sampled_from(ACTIVATION_SCHEMES), max_size=2), st.dictionaries(st.text(max_size=3), st.integers(),
                                                                              max_size=2))
valid = st.sampled_from(ACTIVATION_SCHEMES)
ABSENT = object()


@FAST
@given(top=st.one_of(valid, hostile, st.just(ABSENT)), quant_type=st.sampled_from(["ternary", "int4", "none"]),
       layer_acts=st.one_of(valid, hostile, st.just(ABSENT)),
       layer_type=st.sampled_from(["ternary", "none", ABSENT]), odd_layer=st.sampled_from([None, "q8_k", 3, []]),
       odd_key=st.sampled_from([None, 3, "[bad", None]))
def test_scheme_activations_are_checked(top, quant_type, layer_acts, layer_type, odd_layer, odd_key):
    data = {"quant_type": quant_type, "group_size": 64, "layers": {r"mlp\.down_proj": {}}}
    override = data["layers"][r"mlp\.down_proj"]
    if top is not ABSENT:
        data["activations"] = top
    if layer_acts is not ABSENT:
        override["activations"] = layer_acts
    if layer_type is not ABSENT:
        override["quant_type"] = layer_type
    if odd_layer is not None:
        data["layers"]["q_proj"] = odd_layer  # not a mapping of overrides
    if odd_key is not None:
        data["layers"][odd_key] = {"activations": "none"}  # not a (valid) pattern
    top_value = "none" if top is ABSENT else top
    layer_value = top_value if layer_acts is ABSENT else layer_acts
    layer_quant = quant_type if layer_type is ABSENT else layer_type
    bad_top = top_value not in ACTIVATION_SCHEMES or (top_value != "none" and quant_type == "none")
    bad_layer = layer_acts is not ABSENT and (layer_value not in ACTIVATION_SCHEMES
                                              or (layer_value != "none" and layer_quant == "none"))
    try:
        scheme = QuantScheme.from_dict(data)
    except ConfigError as exc:
        assert exc.message and exc.hint
        problems = exc.problems or [exc.message]
        assert bad_top or bad_layer or odd_layer is not None or odd_key is not None
        if bad_top:
            assert any(p.startswith("activations ") for p in problems), problems
        if bad_layer:
            assert any(p.startswith(r"layers['mlp\\.down_proj']: activations ") for p in problems), problems
        return
    assert not (bad_top or bad_layer or odd_layer is not None or odd_key is not None)
    assert QuantScheme.from_dict(scheme.to_dict()) == scheme
    resolved = scheme.for_module("model.layers.0.mlp.down_proj")
    assert resolved.activations == ("none" if layer_quant == "none" else layer_value)
    assert scheme.for_module("lm_head").activations == "none"
