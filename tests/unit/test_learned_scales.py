"""Learned scales (LSQ) and LoRA inside the quantizer: the autograd of QATLinear.fused_weight against direct autograd
references, the initial value, the floor, fusion and the scheme key."""

import math

import pytest
import torch
from torch import nn

from bitcpm_cli.core.errors import ConfigError, QuantError
from bitcpm_cli.core.quant import (
    LayerQuant,
    QATLinear,
    QuantScheme,
    absmean_scales,
    fake_quantize,
    fuse,
    learned_scale_params,
    prepare,
    quantize,
)

IDS = torch.tensor([[1, 5, 9, 33, 2, 7, 64, 80]])


def _layer(out_features=12, in_features=32, group_size=-1, seed=0) -> QATLinear:
    torch.manual_seed(seed)
    model = nn.Sequential()
    model.add_module("proj", nn.Linear(in_features, out_features, bias=False))
    prepare(model, QuantScheme(group_size=group_size, modules_to_not_convert=(), learned_scales=True))
    layer = model.proj
    with torch.no_grad():  # learned scales away from absmean, so codes differ from the computed ones
        layer.quant_alpha.mul_(torch.empty_like(layer.quant_alpha).uniform_(0.5, 1.5))
    return layer


def _reference_fused(weight: torch.Tensor, alpha: torch.Tensor, group_size: int) -> torch.Tensor:
    """LSQ written with plain autograd ops: the scale's gradient scaled by 1/sqrt(n * Qp) through the detach trick,
    round with a straight-through pass, the clamp as torch differentiates it."""
    rows, groups = alpha.shape
    n = weight.numel() // (rows * groups)
    g = 1.0 / math.sqrt(n * 1)
    s = alpha.clamp_min(1e-5)
    s = (s - s * g).detach() + s * g
    v = weight.reshape(rows, groups, -1) / s.unsqueeze(-1)
    clamped = v.clamp(-1, 1)
    codes = (clamped.round() - clamped).detach() + clamped
    return (codes * s.unsqueeze(-1)).reshape(weight.shape)


@pytest.mark.parametrize("group_size", [-1, 0, 8])
def test_scale_gradient_is_lsq_and_weight_gradient_is_ste(group_size):
    layer = _layer(group_size=group_size)
    upstream = torch.randn(layer.weight.shape)
    (layer.fused_weight() * upstream).sum().backward()

    weight = layer.weight.detach().clone().requires_grad_(False)
    alpha = layer.quant_alpha.detach().clone().requires_grad_(True)
    (_reference_fused(weight, alpha, group_size) * upstream).sum().backward()
    torch.testing.assert_close(layer.quant_alpha.grad, alpha.grad, rtol=1e-5, atol=1e-6)
    assert torch.equal(layer.weight.grad, upstream)  # STE: the gradient passes to the latent weight unchanged


def test_forward_uses_the_learned_scales_bit_for_bit():
    layer = _layer(group_size=8)
    s = layer.quant_alpha.detach().unsqueeze(-1)
    expected = ((layer.weight.detach().reshape(12, 4, 8) / s).round().clamp(-1, 1) * s).reshape(12, 32) + 0.0
    assert torch.equal(layer.fused_weight().detach(), expected)
    q = quantize(layer.weight, layer.quant, scales=layer.quant_alpha)
    assert torch.equal(q.scales, layer.quant_alpha.detach())
    assert torch.equal(q.dequantize(), layer.fused_weight().detach())


def test_initial_scales_are_absmean_so_the_first_forward_is_todays():
    torch.manual_seed(1)
    linear = nn.Linear(32, 12, bias=False)
    model = nn.Sequential()
    model.add_module("proj", linear)
    plain = fake_quantize(linear.weight, LayerQuant("ternary", -1))
    prepare(model, QuantScheme(group_size=-1, modules_to_not_convert=(), learned_scales=True))
    assert model.proj.quant_alpha.dtype == torch.float32 and model.proj.quant_alpha.shape == (12, 1)
    assert torch.equal(model.proj.quant_alpha.detach(), absmean_scales(linear.weight, LayerQuant("ternary", -1)))
    assert torch.equal(model.proj.fused_weight().detach(), plain)


def test_scales_stay_above_the_floor_and_get_no_gradient_below_it():
    layer = _layer()
    with torch.no_grad():
        layer.quant_alpha[0] = -3.0  # an optimizer step may push a scale below zero
    fused = layer.fused_weight()
    assert torch.isfinite(fused).all()
    assert fused.detach()[0].abs().max() <= 1e-5
    fused.sum().backward()
    assert layer.quant_alpha.grad[0].item() == 0.0


def test_lora_factors_get_the_fused_gradient_through_the_ste():
    layer = _layer(group_size=-1)
    layer.weight.requires_grad_(False)
    layer.quant_alpha.requires_grad_(False)
    torch.manual_seed(3)
    a = nn.Parameter(torch.randn(4, 32) * 0.1)
    b = nn.Parameter(torch.randn(12, 4) * 0.1)
    scaling = 0.5
    upstream = torch.randn(12, 32)
    (layer.fused_weight(lora=(a, b, scaling)) * upstream).sum().backward()
    a_ref, b_ref = a.detach().clone().requires_grad_(True), b.detach().clone().requires_grad_(True)
    latent = layer.weight + scaling * (b_ref @ a_ref)
    ste = latent + (fake_quantize(latent.detach(), layer.quant, scales=layer.quant_alpha) - latent).detach()
    (ste * upstream).sum().backward()
    torch.testing.assert_close(a.grad, a_ref.grad)
    torch.testing.assert_close(b.grad, b_ref.grad)
    # the merged latent is what the forward quantized: storing it reproduces the forward exactly
    merged = layer.latent_weight((a, b, scaling))
    assert torch.equal(fake_quantize(merged, layer.quant, scales=layer.quant_alpha),
                       layer.fused_weight(lora=(a, b, scaling)).detach())


def test_fused_weight_is_recomputed_when_the_scales_change():
    layer = _layer()
    before = layer.fused_weight().detach().clone()
    with torch.no_grad():
        layer.quant_alpha.mul_(2)
    assert not torch.equal(layer.fused_weight().detach(), before)


def test_fuse_uses_learned_scales_and_drops_them(tiny_llama, tmp_path):
    prepare(tiny_llama, QuantScheme(group_size=16, learned_scales=True))
    params = learned_scale_params(tiny_llama)
    assert len(params) == 14
    with torch.no_grad():
        for layer in params.values():
            layer.quant_alpha.mul_(1.3)
        qat_logits = tiny_llama(IDS).logits
    assert "model.layers.0.self_attn.q_proj.quant_alpha" in tiny_llama.state_dict()
    fuse(tiny_llama)
    assert not any(name.endswith("quant_alpha") for name in tiny_llama.state_dict())
    with torch.no_grad():
        assert torch.equal(tiny_llama(IDS).logits, qat_logits)


def test_scheme_key_round_trips_and_needs_ternary():
    scheme = QuantScheme(group_size=32, learned_scales=True)
    assert scheme.to_dict()["learned_scales"] is True
    assert QuantScheme.from_dict(scheme.to_dict()) == scheme
    assert "learned_scales" not in QuantScheme().to_dict()  # a checkpoint without them keeps today's meaning
    assert scheme.for_module("model.layers.0.mlp.up_proj").learned
    assert not scheme.for_module("lm_head").learned
    with pytest.raises(ConfigError, match="learned_scales: quant_type 'int4' has no learned scale"):
        QuantScheme(quant_type="int4", learned_scales=True)
    with pytest.raises(ConfigError, match="quant_type 'binary' has no learned scale"):
        QuantScheme(learned_scales=True, layers={"down_proj": {"quant_type": "binary"}})
    with pytest.raises(ConfigError, match="learned_scales must be true or false"):
        QuantScheme.from_dict({"learned_scales": "yes"})


def test_a_learned_layer_without_its_scales_is_refused():
    weight = torch.randn(4, 8)
    with pytest.raises(QuantError, match="learned scales, and none were given"):
        fake_quantize(weight, LayerQuant("ternary", -1, learned=True), name="x")
    with pytest.raises(QuantError, match="do not fit a weight"):
        quantize(weight, LayerQuant("ternary", -1, learned=True), name="x", scales=torch.ones(4, 2))
