"""What trains, from parameter names alone (core/training/selection.py), and the settings that choose it."""

from __future__ import annotations

import pytest
import torch

from bitcpm_cli.core.errors import ConfigError
from bitcpm_cli.core.quant import QuantScheme
from bitcpm_cli.core.training.memory_plan import Shape
from bitcpm_cli.core.training.recipe import TrainConfig, resolve_config
from bitcpm_cli.core.training.selection import Choice, apply_selection, trainable_names

BASE = {"model": "m", "data": ["d.jsonl"], "output_dir": "out"}
SHAPE = Shape(vocab=96, hidden=64, layers=4, heads=4, kv_heads=2, head_dim=16, intermediate=128, tied=False)
TABLE = SHAPE.parameter_table(QuantScheme(group_size=32, learned_scales=True))


def test_full_trains_everything_and_trainable_keys_only_what_they_match():
    assert trainable_names(TABLE, Choice()) == set(TABLE)
    chosen = trainable_names(TABLE, Choice(trainable_keys=("quant_alpha", "norm")))
    assert chosen == {n for n in TABLE if n.endswith(".quant_alpha") or "norm" in n}
    assert "model.norm.weight" in chosen and "model.layers.3.input_layernorm.weight" in chosen
    assert len([n for n in chosen if n.endswith("quant_alpha")]) == 4 * 7  # every layer's seven linears
    globbed = trainable_names(TABLE, Choice(trainable_keys=("model.layers.*.mlp.*.quant_alpha",)))
    assert globbed == {f"model.layers.{i}.mlp.{m}.quant_alpha" for i in range(4) for m in ("gate_proj", "up_proj",
                                                                                             "down_proj")}


def test_freeze_is_llama_factory_s_last_or_first_layers_and_modules():
    last_two = trainable_names(TABLE, Choice(finetuning_type="freeze"))
    assert last_two == {n for n in TABLE if n.startswith(("model.layers.2.", "model.layers.3."))}
    first = trainable_names(TABLE, Choice(finetuning_type="freeze", freeze_trainable_layers=-1,
                                          freeze_trainable_modules="mlp,input_layernorm",
                                          freeze_extra_modules="embed_tokens,norm"))
    assert first == {n for n in TABLE if n.startswith(("model.layers.0.mlp.", "model.layers.0.input_layernorm"))} | {
        "model.embed_tokens.weight", "model.norm.weight"}  # `norm` outside the layers only
    assert len(trainable_names(TABLE, Choice(finetuning_type="freeze", freeze_trainable_layers=99))) == \
        len([n for n in TABLE if ".layers." in n])


def test_lora_trains_nothing_of_the_base_model():
    assert trainable_names(TABLE, Choice(finetuning_type="lora")) == set()


def test_patterns_and_module_names_matching_nothing_are_reported_together():
    with pytest.raises(ConfigError) as info:
        trainable_names(TABLE, Choice(trainable_keys=("quant_alpha", "scale", "alpha_q")), "tiny")
    assert info.value.problems == ["trainable_keys: 'scale' matches no parameter of tiny",
                                   "trainable_keys: 'alpha_q' matches no parameter of tiny"]
    assert "model.layers.N.self_attn.q_proj.quant_alpha" in info.value.hint
    with pytest.raises(ConfigError) as info:
        trainable_names(TABLE, Choice(finetuning_type="freeze", freeze_trainable_modules="attn",
                                      freeze_extra_modules="wte"), "tiny")
    text = "\n".join(info.value.problems)
    assert "freeze_trainable_modules: 'attn' is no module inside a layer of tiny (choose from" in text
    assert "self_attn" in text and "freeze_extra_modules: 'wte' is no module outside the layers" in text


def test_apply_selection_freezes_keeps_dtype_and_upcasts_what_trains(tiny_llama):
    from bitcpm_cli.core.quant import prepare

    model = prepare(tiny_llama.to(torch.bfloat16), QuantScheme(group_size=32, learned_scales=True))
    trainable, frozen = apply_selection(model, Choice(trainable_keys=("quant_alpha", "norm")))
    for name, parameter in model.named_parameters():
        trains = name.endswith("quant_alpha") or "norm" in name
        assert parameter.requires_grad == trains, name
        assert parameter.dtype == (torch.float32 if trains else torch.bfloat16), name
    assert trainable + frozen == sum(p.numel() for p in model.parameters())
    with pytest.raises(ConfigError, match="'lora_A' matches no parameter of the loaded model"):
        apply_selection(model, Choice(trainable_keys=("lora_A",)))


def settings_problems(*overrides: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        resolve_config(TrainConfig, None, BASE, list(overrides))
    return list(info.value.problems) or [info.value.message]


def test_settings_have_llama_factory_s_names_and_defaults():
    config = resolve_config(TrainConfig, None, BASE)
    assert (config.finetuning_type, config.freeze_trainable_layers, config.freeze_trainable_modules,
            config.freeze_extra_modules, config.lora_rank, config.lora_alpha, config.lora_dropout,
            config.lora_target, config.trainable_keys, config.learned_scales, config.kd_loss) == (
        "full", 2, "all", None, 8, None, 0.0, "all", [], None, "kl")
    config = resolve_config(TrainConfig, None, BASE, ["trainable_keys=[quant_alpha, norm]", "kd_loss=mse", "teacher=t",
                                                      "learned_scales=true"])
    assert config.trainable_keys == ["quant_alpha", "norm"] and config.kd_loss == "mse" and config.learned_scales


@pytest.mark.parametrize("overrides, problem", [
    (["finetuning_type=lora", "lora_rank=0"], "lora_rank: must be a whole number of at least 1, got 0"),
    (["finetuning_type=lora", "lora_dropout=0.1"], "lora_dropout: must be 0, got 0.1"),
    (["kd_loss=l2", "teacher=t"], "kd_loss: 'l2' is not one of kl, mse"),
    (["finetuning_type=partial"], "finetuning_type: 'partial' is not one of full, freeze, lora"),
    (["finetuning_type=freeze", "trainable_keys=[norm]"], "trainable_keys: only with finetuning_type full"),
    (["lora_rank=16"], "lora_rank: set for finetuning_type lora, but finetuning_type is full"),
    (["finetuning_type=lora", "freeze_trainable_layers=4"],
     "freeze_trainable_layers: set for finetuning_type freeze, but finetuning_type is lora"),
    (["learned_scales=true", "quant_type=int4"], "learned_scales: quant_type int4 has no learned scale"),
    (["learned_scales=true", "quant_type=none"], "learned_scales: quant_type none has no learned scale"),
    (["kd_loss=mse"], "kd_loss: knowledge distillation runs only with a teacher"),
    (["teacher=t", "kd_loss=mse", "kd_temperature=4"], "kd_temperature: kd_loss mse compares the logits themselves"),
])
def test_bad_settings_are_refused_one_line_each(overrides, problem):
    problems = settings_problems(*overrides)
    assert len(problems) == 1 and problems[0].startswith(problem), problems


def test_every_problem_at_once():
    problems = settings_problems("finetuning_type=lora", "lora_rank=-1", "lora_dropout=0.5", "kd_loss=kld", "teacher=t")
    assert len(problems) == 3


def test_a_selection_that_trains_nothing_is_refused():
    """freeze_trainable_layers 0 without freeze_extra_modules trains no parameter (was autograd's "element 0 of
    tensors does not require grad" after loading); with an extra module something trains."""
    with pytest.raises(ConfigError, match="freeze_trainable_layers 0 trains no parameter of the model"):
        trainable_names(TABLE, Choice(finetuning_type="freeze", freeze_trainable_layers=0))
    assert trainable_names(TABLE, Choice(finetuning_type="freeze", freeze_trainable_layers=0,
                                         freeze_extra_modules="norm")) == {"model.norm.weight"}
