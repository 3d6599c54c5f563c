"""Fuzz the settings that choose what trains (finetuning_type, freeze_*, trainable_keys, lora_*, learned_scales,
kd_*) as `train` and `sft` check them before anything loads: the recipe, then `check_modes` against the model's
config.json (its synthetic parameter table), then the memory plan.

Invariants for every combination: the only exceptions are bitcpm's own errors (exit 2 with one message, never an
internal error); a combination that passes trains at least one parameter (or adds adapters), and what it trains is
what the selection on the table says.
"""

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bitcpm_cli.core.errors import BitcpmError
from bitcpm_cli.core.training.distributed import choose_strategy
from bitcpm_cli.core.training.memory_plan import Shape, plan_memory
from bitcpm_cli.core.training.recipe import TrainConfig, resolve_config
from bitcpm_cli.core.training.selection import Choice, trainable_names
from bitcpm_cli.core.training.train import check_modes
from tests.conftest import tiny_llama_config

BOUNDED = settings(max_examples=150, deadline=None, database=None,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
NAMES = ["quant_alpha", "norm", "mlp", "self_attn", "q_proj", "lm_head", "embed_tokens", "bias", "weight", "layers.0",
         "*", "*.quant_alpha", "model.layers.[01].*", "?", "[", "", " ", ".", "all", "down_proj,up_proj", "nothing"]
text = st.one_of(st.sampled_from(NAMES), st.text(max_size=12))
values = {
    "finetuning_type": st.one_of(st.sampled_from(["full", "freeze", "lora"]), text),
    "trainable_keys": st.lists(text, max_size=3),
    "freeze_trainable_layers": st.one_of(st.integers(-4, 4), st.just(10**9), text),
    "freeze_trainable_modules": st.one_of(st.sampled_from(["all", "mlp", "self_attn", "mlp,self_attn"]), text),
    "freeze_extra_modules": st.one_of(st.none(), st.sampled_from(["norm", "embed_tokens", "lm_head"]), text),
    "lora_rank": st.one_of(st.integers(-2, 64), text),
    "lora_alpha": st.one_of(st.none(), st.integers(-2, 64), st.floats(allow_nan=True)),
    "lora_dropout": st.one_of(st.just(0.0), st.floats(allow_nan=True)),
    "lora_target": st.one_of(st.sampled_from(["all", "q_proj", "q_proj,v_proj", "lm_head", "embed_tokens"]), text),
    "learned_scales": st.one_of(st.none(), st.booleans(), text),
    "kd_loss": st.one_of(st.sampled_from(["kl", "mse"]), text),
    "quant_type": st.one_of(st.none(), st.sampled_from(["ternary", "int4", "binary", "none"])),
    "group_size": st.one_of(st.none(), st.sampled_from([-1, 0, 16, 32, 7])),
}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A config.json-only model folder: nothing can load, so a check that came after loading would show."""
    folder = tmp_path_factory.mktemp("fuzzmodes") / "m"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({**tiny_llama_config().to_dict(), "torch_dtype": "float32"}))
    return folder


@BOUNDED
@given(chosen=st.fixed_dictionaries({}, optional=values))
def test_mode_settings_are_checked_before_loading_and_only_with_bitcpm_errors(model, chosen):
    flags = {"model": str(model), "data": ["x.txt"], "output_dir": str(model.parent / "out")}
    overrides = [f"{key}={json.dumps(value) if not isinstance(value, str) else value}"
                 for key, value in chosen.items()]
    try:
        config = resolve_config(TrainConfig, None, flags, overrides)
        notes: list[str] = []
        strategy = choose_strategy(config.deepspeed, config.training_args, notes)
        scheme = check_modes(config, model, strategy, notes)
        plan = plan_memory(model, config, strategy.kind, strategy.world, _Cpu(), scheme)
    except BitcpmError as error:
        assert error.message.strip() and "\n" not in error.message.strip().splitlines()[0]
        return
    choice = Choice.from_config(config)
    table = Shape.from_config(model / "config.json").parameter_table(scheme)
    trained = trainable_names(table, choice)
    assert trained or choice.finetuning_type == "lora", chosen
    assert plan.parts["activations per micro-batch"] > 0


class _Cpu:
    type = "cpu"
