"""The memory plan is computed from config.json and the settings alone, checked at the BitCPM4-1B shape."""

import json

import pytest
import torch

from bitcpm_cli.core.training.memory_plan import GIB, Settings, Shape, estimate, plan_memory
from bitcpm_cli.core.training.recipe import TrainConfig, resolve_config

BITCPM4_1B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 73448, "hidden_size": 2048,
              "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 2,
              "intermediate_size": 6144, "head_dim": 128, "tie_word_embeddings": False,
              "max_position_embeddings": 4096}


@pytest.fixture
def model_1b(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(BITCPM4_1B))
    return tmp_path


def config(*overrides):
    return resolve_config(TrainConfig, None, {"model": "m", "data": ["d"], "output_dir": "o"},
                          ["block_size=512", *overrides])


def test_parameter_count_matches_the_model_transformers_builds(model_1b):
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = Shape.from_config(model_1b / "config.json")
    with torch.device("meta"):  # shapes only, nothing allocated
        model = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in BITCPM4_1B.items() if k != "model_type"}))
    assert shape.parameters() == sum(p.numel() for p in model.parameters())
    linears = sum(m.weight.numel() for name, m in model.named_modules()
                  if isinstance(m, torch.nn.Linear) and name != "lm_head")
    assert shape.linear_parameters() == linears


def test_one_process_on_24_gib_does_not_fit_and_names_what_would(model_1b):
    plan = plan_memory(model_1b, config("max_memory_gb=24"), "single", 1, torch.device("cpu"))
    params = plan.parameters
    assert plan.parts["weights"] == plan.parts["gradients"] == 4 * params
    assert plan.parts["optimizer states (AdamW)"] == 8 * params
    assert plan.total > 24 * GIB and not plan.fits  # ~26 GB of fp32 weights + gradients + AdamW alone
    assert plan.suggestions == ["deepspeed=configs/deepspeed/zero3.json over 2 machines"]
    assert any(line.startswith("activations per micro-batch") for line in plan.lines())


def test_sharding_divides_what_each_stage_shards(model_1b):
    shape = Shape.from_config(model_1b / "config.json")
    base = dict(batch_size=1, sequence=512, bf16=False, gradient_checkpointing=False, quantized=True)
    ddp, zero2, zero3 = (estimate(shape, Settings(kind=kind, world=8, **base)) for kind in ("ddp", "zero2", "zero3"))
    assert zero2["weights"] == ddp["weights"] and zero2["gradients"] == ddp["gradients"] // 8
    assert zero2["optimizer states (AdamW)"] == ddp["optimizer states (AdamW)"] // 8
    assert zero3["weights"] == ddp["weights"] // 8
    assert zero3["fused weights (QAT)"] == ddp["fused weights (QAT)"] // 28  # one gathered layer at a time
    fsdp = estimate(shape, Settings(kind="fsdp", world=8, **base))
    assert fsdp == zero3
    checkpointed = estimate(shape, Settings(kind="ddp", world=8, **{**base, "gradient_checkpointing": True}))
    assert checkpointed["activations per micro-batch"] < ddp["activations per micro-batch"] / 2
    sixteen = estimate(shape, Settings(kind="zero3", world=8, **{**base, "bf16": True}))
    assert sixteen["weights"] == zero3["weights"] // 2


def test_the_npu_recipe_fits_on_64_gib_devices(model_1b):
    from pathlib import Path

    recipe = Path(__file__).resolve().parents[2] / "configs" / "pretrain" / "bitcpm-1b-npu-zero2.yaml"
    settings = resolve_config(TrainConfig, recipe, {"model": "m", "data": ["d"], "output_dir": "o"},
                              ["max_memory_gb=64"])
    plan = plan_memory(model_1b, settings, "zero2", 8, torch.device("cuda"))  # one device a rank
    assert plan.fits, plan.lines()


def test_a_missing_shape_field_is_an_input_error(tmp_path):
    from bitcpm_cli.core.errors import InputError

    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 10}))
    with pytest.raises(InputError, match="no hidden_size, num_hidden_layers"):
        Shape.from_config(tmp_path / "config.json")


def test_an_npu_run_is_planned_against_the_npu_memory(model_1b, fake_npu):
    fake_npu(available=True, count=2)  # 64 GiB devices (the Ascend 910B stand-in)
    plan = plan_memory(model_1b, config(), "single", 1, torch.device("npu", 1))
    assert (plan.available, plan.available_from) == (64 * GIB, "npu:1 memory")
    assert plan.fits  # ~18 GB of fp32 weights, gradients and AdamW state for the 1B shape
