import pytest
import torch
from torch import nn

from bitcpm_cli.core.errors import QuantError
from bitcpm_cli.core.quant import QATLinear, QuantScheme, fake_quantize, fuse, prepare, qat_layers

from tests.conftest import tiny_llama_config

IDS = torch.tensor([[1, 5, 9, 33, 2, 7, 64, 80]])


def test_prepare_swaps_decoder_linears_and_skips_embeddings_and_lm_head(tiny_llama):
    keys_before = list(tiny_llama.state_dict())
    prepare(tiny_llama, QuantScheme(group_size=16))
    layers = qat_layers(tiny_llama)
    assert len(layers) == 2 * 7  # q, k, v, o, gate, up, down per layer
    assert "lm_head" not in layers
    assert type(tiny_llama.lm_head) is nn.Linear
    assert type(tiny_llama.model.embed_tokens) is nn.Embedding
    assert list(tiny_llama.state_dict()) == keys_before
    assert tiny_llama.config.bitcpm_quant["group_size"] == 16


def test_fused_logits_equal_qat_logits_bit_exact(tiny_llama):
    prepare(tiny_llama, QuantScheme(group_size=32))
    with torch.no_grad():
        qat_logits = tiny_llama(IDS).logits
    fuse(tiny_llama)
    assert not qat_layers(tiny_llama)
    assert not hasattr(tiny_llama.config, "bitcpm_quant")
    with torch.no_grad():
        fused_logits = tiny_llama(IDS).logits
    assert torch.equal(qat_logits, fused_logits)


def test_qat_forward_differs_from_float_forward(tiny_llama):
    with torch.no_grad():
        float_logits = tiny_llama(IDS).logits
        prepare(tiny_llama, QuantScheme(group_size=-1))
        assert not torch.equal(tiny_llama(IDS).logits, float_logits)


def test_fused_model_loads_in_stock_transformers(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    prepare(tiny_llama, QuantScheme(group_size=-1))
    with torch.no_grad():
        qat_logits = tiny_llama(IDS).logits
    fuse(tiny_llama).save_pretrained(tmp_path)
    stock = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert type(stock.model.layers[0].mlp.down_proj) is nn.Linear
    with torch.no_grad():
        assert torch.equal(stock(IDS).logits, qat_logits)


def test_qat_checkpoint_state_dict_loads_in_stock_model(tiny_llama):
    from transformers import LlamaForCausalLM

    prepare(tiny_llama, QuantScheme(group_size=32))
    stock = LlamaForCausalLM(tiny_llama_config())
    missing, unexpected = stock.load_state_dict(tiny_llama.state_dict(), strict=True)
    assert not missing and not unexpected


def test_training_step_updates_latent_weights_through_ste(tiny_llama):
    prepare(tiny_llama, QuantScheme(group_size=16)).train()
    layer = tiny_llama.model.layers[0].mlp.up_proj
    before = layer.weight.detach().clone()
    optimizer = torch.optim.SGD(tiny_llama.parameters(), lr=0.1)
    loss = tiny_llama(IDS, labels=IDS).loss
    loss.backward()
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
    optimizer.step()
    assert not torch.equal(layer.weight, before)
    assert isinstance(layer, QATLinear)


def test_bfloat16_qat_and_fuse_agree(tiny_llama):
    model = tiny_llama.to(torch.bfloat16)
    prepare(model, QuantScheme(group_size=32))
    weight = model.model.layers[1].self_attn.o_proj.weight.detach().clone()
    fuse(model)
    assert torch.equal(model.model.layers[1].self_attn.o_proj.weight,
                       fake_quantize(weight, QuantScheme(group_size=32).for_module("o_proj")))


def test_group_size_error_names_every_bad_layer(tiny_llama):
    # hidden 64 and intermediate 128: group 48 fits neither; the error lists the layers, nothing is swapped.
    with pytest.raises(QuantError) as info:
        prepare(tiny_llama, QuantScheme(group_size=48))
    assert any("model.layers.0.mlp.down_proj" in p for p in info.value.problems)
    assert not qat_layers(tiny_llama)


def test_tied_lm_head_cannot_be_quantized():
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(tiny_llama_config(tie_word_embeddings=True))
    with pytest.raises(QuantError, match="tied to the input embeddings"):
        prepare(model, QuantScheme(group_size=32, modules_to_not_convert=("embed_tokens",)))


def test_per_layer_override_and_none(tiny_llama):
    scheme = QuantScheme(group_size=64, layers={r"mlp\.down_proj": {"group_size": -1}, r"v_proj": {"quant_type": "none"}})
    prepare(tiny_llama, scheme)
    layers = qat_layers(tiny_llama)
    assert layers["model.layers.0.mlp.down_proj"].quant.group_size == -1
    assert "model.layers.0.self_attn.v_proj" not in layers


@pytest.mark.parametrize("fused_optimizer", [False, True])
def test_fused_weight_is_computed_once_per_optimizer_step(tiny_llama, monkeypatch, fused_optimizer):
    from bitcpm_cli.core.quant import qat

    prepare(tiny_llama, QuantScheme(group_size=16)).train()
    calls = []
    real = qat.fake_quantize
    monkeypatch.setattr(qat, "fake_quantize", lambda *a, **k: calls.append(1) or real(*a, **k))
    # fused AdamW (the Trainer's default) updates weights without bumping their version counters
    optimizer = torch.optim.AdamW(tiny_llama.parameters(), lr=1e-2, fused=fused_optimizer)
    for _ in range(3):  # three micro-batches of gradient accumulation
        tiny_llama(IDS, labels=IDS).loss.backward()
    assert len(calls) == 14  # once per quantized linear, not once per micro-batch
    optimizer.step()
    tiny_llama(IDS, labels=IDS).loss.backward()
    assert len(calls) == 28  # the step changed every latent weight: recomputed
    layer = tiny_llama.model.layers[0].mlp.up_proj
    assert torch.equal(layer.fused_weight().detach(), fake_quantize(layer.weight.detach(), layer.quant))
