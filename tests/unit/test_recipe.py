import pytest

from bitcpm_cli.core.errors import ConfigError
from bitcpm_cli.core.training.recipe import TrainConfig, resolve_config

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
    recipe.write_text("max_step: 10\nlearning_rat: 1\n")
    with pytest.raises(ConfigError) as info:
        resolve_config(TrainConfig, recipe, BASE, ["batch_size=two", "grad_acum=2", "novalue"])
    text = "\n".join(info.value.problems)
    assert "unknown setting 'max_step' (did you mean 'max_steps'?)" in text
    assert "unknown setting 'grad_acum' (did you mean 'grad_accum'?)" in text
    assert "'two' is not a valid int" in text
    assert "'novalue': overrides are key=value" in text
    assert "unknown setting 'learning_rat' (did you mean 'learning_rate'?)" in text


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


def test_hugging_face_names_are_aliases_of_bitcpm_settings(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("learning_rate: 1.0e-3\nper_device_train_batch_size: 8\nlr_scheduler_type: linear\n")
    config = resolve_config(TrainConfig, recipe, BASE, ["gradient_accumulation_steps=4", "activation_checkpointing=1"])
    assert (config.lr, config.batch_size, config.lr_scheduler, config.grad_accum, config.gradient_checkpointing) == (
        1e-3, 8, "linear", 4, True)
    assert config.training_args == {}
    # bitcpm's short name in a later layer overrides the HF name in an earlier one
    assert resolve_config(TrainConfig, recipe, BASE, ["lr=2e-3"]).lr == 2e-3


def test_both_names_of_one_setting_in_one_layer_conflict(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("lr: 1.0e-3\nlearning_rate: 2.0e-3\n")
    with pytest.raises(ConfigError) as info:
        resolve_config(TrainConfig, recipe, BASE, ["batch_size=2", "per_device_train_batch_size=4"])
    text = "\n".join(info.value.problems)
    assert "lr and learning_rate name the same setting with different values (0.001 vs 0.002)" in text
    assert "batch_size and per_device_train_batch_size name the same setting with different values (2 vs 4)" in text
    assert resolve_config(TrainConfig, None, BASE, ["lr=1e-3", "learning_rate=1e-3"]).lr == 1e-3  # equal: fine


def test_every_other_training_arguments_field_passes_through(tmp_path):
    import dataclasses

    from transformers import TrainingArguments

    recipe = tmp_path / "r.yaml"
    recipe.write_text("report_to: [tensorboard]\nfsdp_config: {version: 2}\noptim: adamw_torch\n")
    config = resolve_config(TrainConfig, recipe, BASE, ["num_train_epochs=2", "warmup_ratio=0.1", "fsdp=full_shard",
                                                        "dataloader_drop_last=yes", "label_smoothing_factor=0"])
    assert config.training_args == {"report_to": ["tensorboard"], "fsdp_config": {"version": 2},
                                    "optim": "adamw_torch", "num_train_epochs": 2.0,
                                    "fsdp": "full_shard", "dataloader_drop_last": True, "label_smoothing_factor": 0.0}
    assert config.max_steps == -1 and config.warmup_ratio == 0.1  # the epochs decide, as in transformers
    assert resolve_config(TrainConfig, None, BASE, ["num_train_epochs=2", "max_steps=7"]).max_steps == 7
    with pytest.raises(ConfigError) as info:
        resolve_config(TrainConfig, None, BASE, ["dataloader_drop_last=maybe", "use_cpu=true",
                                                 "remove_unused_columns=true", "report_too=tensorboard"])
    text = "\n".join(info.value.problems)
    assert "dataloader_drop_last: 'maybe' is not a valid bool" in text
    assert "use_cpu: bitcpm sets this itself; use device=cpu" in text
    assert "remove_unused_columns: bitcpm sets this itself" in text
    assert "unknown setting 'report_too' (did you mean 'report_to'?)" in text
    every = {f.name for f in dataclasses.fields(TrainingArguments) if f.init}
    from bitcpm_cli.core.training.recipe import HF_REFUSED, list_settings

    listed = {row["name"] for row in list_settings(TrainConfig)} | {a for row in list_settings(TrainConfig)
                                                                      for a in row["aliases"]}
    assert every <= listed and set(HF_REFUSED) <= every
