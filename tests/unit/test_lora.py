"""LoRA inside the fake quantizer (core/training/lora.py): target resolution and its errors, the layer's forward and
gradients against direct references, the exact merge, the adapter_config.json marker and the resume checks."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from bitcpm_cli.core.errors import ConfigError, InputError
from bitcpm_cli.core.quant import QuantScheme, prepare
from bitcpm_cli.core.quant.functional import fake_quantize
from bitcpm_cli.core.training.lora import (
    MARKER,
    add_lora,
    check_resume_checkpoint,
    is_lora_model,
    lora_parameter_count,
    lora_targets,
    merge_lora,
)
from bitcpm_cli.core.training.recipe import lora_setting_problems
from tests.conftest import tiny_llama_config

LINEARS = [f"model.layers.{i}.{part}" for i in range(2) for part in (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
    "mlp.down_proj")] + ["lm_head"]


def settings(**overrides) -> SimpleNamespace:
    values = dict(finetuning_type="lora", lora_rank=4, lora_alpha=8.0, lora_dropout=0.0, lora_target="all",
                  resume=False, output_dir=None)
    values.update(overrides)
    return SimpleNamespace(**values)


def test_all_is_every_linear_but_the_lm_head():
    assert lora_targets(LINEARS, LINEARS[:-1], settings()) == LINEARS[:-1]
    assert "model.out" not in lora_targets(LINEARS + ["model.out"], [], settings(), output_embedding="model.out")


def test_named_targets_match_as_peft_target_modules():
    assert lora_targets(LINEARS, [], settings(lora_target="q_proj, v_proj")) == [
        n for n in LINEARS if n.endswith(("q_proj", "v_proj"))]
    assert lora_targets(LINEARS, [], settings(lora_target=["lm_head"])) == ["lm_head"]
    # a suffix matches only whole dotted parts, as peft's target_modules list does
    with pytest.raises(ConfigError):
        lora_targets(LINEARS, [], settings(lora_target="proj"))


def test_a_name_matching_no_linear_lists_the_available_ones():
    with pytest.raises(ConfigError) as caught:
        lora_targets(LINEARS, LINEARS[:-1], settings(lora_target="q_proj,qkv,dense"))
    assert caught.value.message == "lora_target: qkv, dense names no linear module of this model"
    assert "q_proj" in caught.value.hint and "lm_head (not quantized)" in caught.value.hint
    assert "down_proj (not quantized)" not in caught.value.hint


def test_setting_problems_are_reported_together():
    problems = lora_setting_problems(settings(lora_rank=0, lora_dropout=0.1, lora_alpha=-1))
    assert [p.split(":")[0] for p in problems] == ["lora_rank", "lora_alpha", "lora_dropout"]
    assert lora_setting_problems(settings()) == []


def test_parameter_count_is_rank_times_in_plus_out_per_target():
    shapes = {"a.q_proj": (64, 32), "a.v_proj": (16, 32), "lm_head": (96, 64)}
    assert lora_parameter_count(shapes, settings(lora_rank=8)) == 8 * (96 + 48)
    assert lora_parameter_count(shapes, settings(lora_rank=2, lora_target="v_proj")) == 2 * 48


def test_missing_peft_is_an_input_error(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_peft(name, *args, **kwargs):
        if name == "peft" or name.startswith("peft."):
            raise ImportError("No module named 'peft'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_peft)
    with pytest.raises(InputError) as caught:
        lora_targets(LINEARS, [], settings())
    assert caught.value.message == "finetuning_type lora needs peft"
    assert caught.value.hint == "pip install 'bitcpm[lora]'"


def _model(learned: bool = False, seed: int = 0):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config()).float()
    return prepare(model, QuantScheme(group_size=32, learned_scales=learned))


def _randomise_adapters(peft_model, seed: int = 1) -> None:
    """peft starts B at zero (the adapter a no-op): give A and B values so that the tests see them."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)


@pytest.fixture(scope="module")
def adapted():
    model = add_lora(_model(), settings())
    _randomise_adapters(model)
    return model


def _layer(model, name="model.layers.0.self_attn.q_proj"):
    return dict(model.named_modules())[f"base_model.model.{name}"]


def test_only_adapters_train_and_the_marker_is_in_the_config(adapted):
    trainable = [n for n, p in adapted.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(trainable) == 2 * 14  # 7 linears x 2 layers, lm_head left out by `all`
    assert is_lora_model(adapted) and getattr(adapted.peft_config["default"], MARKER) is True


def test_forward_is_the_linear_of_the_fused_sum(adapted):
    layer = _layer(adapted)
    base = layer.get_base_layer()
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    scaling = layer.scaling["default"]
    assert scaling == 2.0
    x = torch.randn(3, 5, 64)
    latent = base.weight.detach() + scaling * (b.detach() @ a.detach())
    expected = nn.functional.linear(x, fake_quantize(latent, base.quant, name="q"), base.bias)
    with torch.no_grad():
        assert torch.equal(layer(x), expected)
    # and not the side adapter stock peft would run
    side = nn.functional.linear(x, fake_quantize(base.weight.detach(), base.quant)) + scaling * (x @ a.T @ b.T)
    assert not torch.allclose(layer(x), side)


def test_gradients_of_a_and_b_match_an_autograd_reference_through_the_ste(adapted):
    layer = _layer(adapted, "model.layers.1.mlp.down_proj")
    base = layer.get_base_layer()
    a_param, b_param = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    scaling = layer.scaling["default"]
    x = torch.randn(2, 7, base.in_features)
    target = torch.randn(2, 7, base.out_features)
    a_param.grad = b_param.grad = None
    ((layer(x) - target) ** 2).sum().backward()

    a, b = a_param.detach().clone().requires_grad_(), b_param.detach().clone().requires_grad_()
    latent = base.weight.detach() + scaling * (b @ a)
    quantized = fake_quantize(latent.detach(), base.quant)
    ste = latent + (quantized - latent).detach()
    ((nn.functional.linear(x, ste, base.bias) - target) ** 2).sum().backward()
    torch.testing.assert_close(a_param.grad, a.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(b_param.grad, b.grad, rtol=1e-4, atol=1e-5)
    assert base.weight.grad is None


def test_plain_linear_gets_plain_lora_whose_merge_is_exact():
    model = add_lora(_model(), settings(lora_target="lm_head,q_proj"))
    _randomise_adapters(model, seed=3)
    head = _layer(model, "lm_head")
    assert type(head.get_base_layer()) is nn.Linear
    a, b, s = head.lora_A["default"].weight, head.lora_B["default"].weight, head.scaling["default"]
    x = torch.randn(2, 3, 64)
    with torch.no_grad():
        expected = nn.functional.linear(x, head.get_base_layer().weight + s * (b @ a))
        assert torch.equal(head(x), expected)


@pytest.mark.parametrize("learned", [False, True])
def test_merged_model_gives_the_trained_logits_bit_for_bit(learned):
    model = add_lora(_model(learned=learned), settings(lora_target="all"))
    _randomise_adapters(model, seed=5)
    if learned:  # the scales are frozen under LoRA, at their initial value
        scales = {n: p for n, p in model.named_parameters() if n.endswith("quant_alpha")}
        assert scales and not any(p.requires_grad for p in scales.values())
    ids = torch.randint(0, 96, (2, 12))
    with torch.no_grad():
        trained = model(input_ids=ids).logits
    merged = merge_lora(model)
    assert not is_lora_model(merged) and not any("lora_" in n for n, _ in merged.named_parameters())
    assert all(p.dtype == torch.float32 for p in merged.parameters())
    with torch.no_grad():
        assert torch.equal(merged(input_ids=ids).logits, trained)
    assert "bitcpm_quant" in merged.config.to_dict()


def test_merged_checkpoint_reloads_to_the_same_logits(tmp_path):
    from transformers import AutoModelForCausalLM

    model = add_lora(_model(), settings(lora_target="all"))
    _randomise_adapters(model, seed=7)
    ids = torch.randint(0, 96, (1, 10))
    with torch.no_grad():
        trained = model(input_ids=ids).logits
    merge_lora(model).save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    prepare(reloaded, QuantScheme.from_config(reloaded.config))
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, trained)


def test_adapter_config_carries_the_marker_and_stock_peft_drops_it(tmp_path, adapted):
    adapted.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved[MARKER] is True and saved["r"] == 4 and saved["lora_alpha"] == 8
    from peft import LoraConfig

    assert not hasattr(LoraConfig.from_pretrained(tmp_path), MARKER)  # stock peft ignores it: a side adapter there
    check_resume_checkpoint(tmp_path, settings(), saved["target_modules"])


def test_resume_refuses_what_does_not_match(tmp_path, adapted):
    adapted.save_pretrained(tmp_path)
    config_file = tmp_path / "adapter_config.json"
    with pytest.raises(InputError, match="holds a LoRA adapter .* but finetuning_type is full"):
        check_resume_checkpoint(tmp_path, settings(finetuning_type="full"))
    with pytest.raises(InputError, match=r"r is 4 .* but 8 in this run"):
        check_resume_checkpoint(tmp_path, settings(lora_rank=8, lora_alpha=8.0))
    with pytest.raises(InputError, match="target_modules .* differ"):
        check_resume_checkpoint(tmp_path, settings(), ["model.layers.0.self_attn.q_proj"])
    saved = json.loads(config_file.read_text())
    del saved[MARKER]
    config_file.write_text(json.dumps(saved))
    with pytest.raises(InputError, match="not bitcpm's adapter inside the quantizer"):
        check_resume_checkpoint(tmp_path, settings())
    with pytest.raises(InputError, match="holds no LoRA adapter"):
        check_resume_checkpoint(tmp_path / "nothing", settings())


def test_a_target_tied_to_the_input_embeddings_is_refused():
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(tie_word_embeddings=True))
    with pytest.raises(ConfigError, match="lm_head shares its weight with the input embeddings"):
        add_lora(model, settings(lora_target="lm_head"))


def test_unmerge_is_refused(adapted):
    with pytest.raises(ConfigError, match="cannot be unmerged"):
        _layer(adapted).unmerge()
