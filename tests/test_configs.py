"""Every shipped YAML/JSON in configs/ loads and validates."""

import json
from pathlib import Path

import pytest

from bitcpm_cli.core.quant import QuantScheme, load_scheme_file
from bitcpm_cli.core.recipe import TrainConfig, resolve_config
from bitcpm_cli.core.sft import SftConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
ALL_FILES = sorted(p for p in CONFIGS.rglob("*") if p.suffix in (".yaml", ".yml", ".json"))
REQUIRED = {"model": "m", "data": ["d.jsonl"], "output_dir": "out"}


def in_folder(name):
    return [p for p in ALL_FILES if p.parent.name == name]


def test_configs_exist():
    assert ALL_FILES, "configs/ holds no YAML or JSON"


@pytest.mark.parametrize("path", in_folder("quant"), ids=lambda p: p.name)
def test_quant_schemes_load(path):
    scheme = load_scheme_file(path)
    assert isinstance(scheme, QuantScheme)
    assert scheme.for_module("lm_head").quant_type == "none"


@pytest.mark.parametrize("path", in_folder("pretrain"), ids=lambda p: p.name)
def test_pretrain_recipes_validate(path):
    config = resolve_config(TrainConfig, path, REQUIRED)
    assert config.max_steps >= 1
    if config.deepspeed:
        assert (CONFIGS.parent / config.deepspeed).is_file(), f"{path.name} names a missing DeepSpeed file"


@pytest.mark.parametrize("path", in_folder("sft"), ids=lambda p: p.name)
def test_sft_recipes_validate(path):
    config = resolve_config(SftConfig, path, REQUIRED)
    assert config.max_length >= 2
    if config.deepspeed:
        assert (CONFIGS.parent / config.deepspeed).is_file(), f"{path.name} names a missing DeepSpeed file"


def test_baichuan2_hyper_parameters():
    config = resolve_config(SftConfig, CONFIGS / "sft" / "bitcpm-1b-npu-baichuan2.yaml", REQUIRED)
    assert (config.lr, config.lr_scheduler, config.adam_beta1, config.adam_beta2, config.adam_epsilon,
            config.weight_decay, config.max_grad_norm, config.bf16, config.gradient_checkpointing,
            config.max_length) == (2e-5, "constant", 0.9, 0.98, 1e-8, 1e-4, 1.0, True, True, 512)


@pytest.mark.parametrize("path", in_folder("deepspeed"), ids=lambda p: p.name)
def test_deepspeed_configs_parse(path):
    config = json.loads(path.read_text())
    assert config["zero_optimization"]["stage"] in (1, 2, 3)
    # "auto" lets the Trainer fill batch sizes, accumulation and clipping from bitcpm's settings
    assert config["train_micro_batch_size_per_gpu"] == "auto" and config["gradient_accumulation_steps"] == "auto"


def test_every_config_is_covered():
    covered = set(in_folder("quant") + in_folder("pretrain") + in_folder("sft") + in_folder("deepspeed"))
    assert covered == set(ALL_FILES), f"add a loader test for {sorted(set(ALL_FILES) - covered)}"
