import pytest

from bitcpm_cli.core.errors import ConfigError
from bitcpm_cli.core.recipe import TrainConfig, resolve_config

BASE = {"model": "m", "data": ["d.jsonl"], "output_dir": "out"}


def test_precedence_defaults_yaml_flags_overrides(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("max_steps: 10\nlr: 1.0e-3\nbatch_size: 8\nbf16: true\n")
    config = resolve_config(TrainConfig, recipe, {**BASE, "lr": 2e-3, "batch_size": 4}, ["batch_size=2", "lr=3e-4"])
    assert config.max_steps == 10  # YAML over default
    assert config.bf16 is True
    assert config.batch_size == 2 and config.lr == 3e-4  # key=value over flags over YAML
    assert config.grad_accum == 1  # default


def test_unknown_keys_get_suggestions_and_all_problems_are_reported(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("max_step: 10\nlearning_rate: 1\n")
    with pytest.raises(ConfigError) as info:
        resolve_config(TrainConfig, recipe, BASE, ["batch_size=two", "grad_acum=2", "novalue"])
    text = "\n".join(info.value.problems)
    assert "unknown setting 'max_step' (did you mean 'max_steps'?)" in text
    assert "unknown setting 'grad_acum' (did you mean 'grad_accum'?)" in text
    assert "'two' is not a valid int" in text
    assert "'novalue': overrides are key=value" in text
    assert "learning_rate" in text


def test_values_are_validated(tmp_path):
    with pytest.raises(ConfigError) as info:
        resolve_config(TrainConfig, None, {"max_steps": 0, "lr_scheduler": "cosin", "quant_type": "ternry"})
    text = "\n".join(info.value.problems)
    assert "model: not set" in text and "data: no data files" in text and "output_dir: not set" in text
    assert "max_steps: must be at least 1" in text
    assert "did you mean 'cosine'" in text and "did you mean 'ternary'" in text


def test_lists_and_nulls():
    config = resolve_config(TrainConfig, None, BASE, ["data=a.jsonl,b.txt", "save_total_limit=null", "group_size=-1"])
    assert config.data == ["a.jsonl", "b.txt"] and config.save_total_limit is None and config.group_size == -1
