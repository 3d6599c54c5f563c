"""The memory plan is computed from config.json and the settings alone, checked at the BitCPM4-1B shape."""

import json
from pathlib import Path

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
    # the light training modes fit too (frozen parameters held at the checkpoint's dtype, here float32)
    assert plan.suggestions == ["deepspeed=configs/deepspeed/zero3.json over 2 machines",
                                "trainable_keys=[quant_alpha,norm] learned_scales=true", "finetuning_type=lora",
                                "finetuning_type=freeze"]
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


# ---- what trains: the plan counts exactly that ------------------------------------------------------------------
def test_the_name_table_is_the_prepared_model_s_named_parameters():
    """Shape.parameter_table (names and numel, quant_alpha of a learned-scales scheme included) equals a real tiny
    model's named_parameters after prepare, tied and untied."""
    from transformers import LlamaForCausalLM

    from bitcpm_cli.core.quant import QuantScheme, prepare
    from tests.conftest import tiny_llama_config

    for tied in (False, True):
        for scheme in (None, QuantScheme(group_size=32), QuantScheme(group_size=32, learned_scales=True),
                       QuantScheme(group_size=-1, learned_scales=True, layers={"mlp\\.down_proj": {"group_size": 0}})):
            config = tiny_llama_config(tie_word_embeddings=tied)
            model = LlamaForCausalLM(config)
            if scheme is not None:
                prepare(model, scheme)
            path = Path(pytest.importorskip("tempfile").mkdtemp()) / "config.json"
            path.write_text(config.to_json_string())
            table = Shape.from_config(path).parameter_table(scheme)
            real = {name: tuple(p.shape) for name, p in model.named_parameters()}
            assert table == real and list(table) == list(real), (tied, scheme)


def plan_with(model_1b, *overrides, kind="single", world=1):
    return plan_memory(model_1b, config("max_memory_gb=24", *overrides), kind, world, torch.device("cpu"))


def test_trainable_keys_count_only_scales_and_norms_as_trainable(model_1b):
    shape = Shape.from_config(model_1b / "config.json")
    plan = plan_with(model_1b, "trainable_keys=[quant_alpha,norm]", "learned_scales=true")
    scales = sum(rows * (cols // 128) for rows, cols in (
        (2048, 2048), (256, 2048), (256, 2048), (2048, 2048), (6144, 2048), (6144, 2048), (2048, 6144))) * 28
    norms = (2 * 28 + 1) * 2048
    assert plan.parts["weights"] == plan.parts["gradients"] == 4 * (scales + norms)
    assert plan.parts["optimizer states (AdamW)"] == 8 * (scales + norms)
    assert plan.parts["frozen weights"] == 4 * (shape.parameters() - norms)  # config.json states no dtype: float32
    assert plan.parameters == shape.parameters() + scales and plan.fits and not plan.suggestions


def test_frozen_parameters_are_held_at_the_checkpoint_dtype_and_lora_counts_its_adapters(model_1b):
    pytest.importorskip("peft")
    (model_1b / "config.json").write_text(json.dumps({**BITCPM4_1B, "torch_dtype": "bfloat16"}))
    shape = Shape.from_config(model_1b / "config.json")
    plan = plan_with(model_1b, "finetuning_type=lora", "lora_rank=16", "bf16=true")
    linears = ((2048, 2048), (256, 2048), (256, 2048), (2048, 2048), (6144, 2048), (6144, 2048), (2048, 6144))
    adapters = 28 * sum(16 * (rows + cols) for rows, cols in linears)
    assert plan.parts["weights"] == 4 * adapters and plan.parts["optimizer states (AdamW)"] == 8 * adapters
    assert plan.parts["frozen weights"] == 2 * shape.parameters()
    assert plan.parts["fused weights (QAT)"] == 2 * shape.linear_parameters()  # cached at the frozen weights' dtype


def test_freeze_trains_the_last_layers(model_1b):
    shape = Shape.from_config(model_1b / "config.json")
    per_layer = (shape.linear_parameters() // 28) + 2 * 2048
    plan = plan_with(model_1b, "finetuning_type=freeze", "freeze_trainable_layers=3")
    assert plan.parts["weights"] == 4 * 3 * per_layer
    plan = plan_with(model_1b, "finetuning_type=freeze", "freeze_trainable_modules=mlp",
                     "freeze_extra_modules=embed_tokens")
    assert plan.parts["weights"] == 4 * (2 * 3 * 2048 * 6144 + 73448 * 2048)


def test_the_teacher_is_counted(model_1b, tmp_path):
    teacher = tmp_path / "teacher"
    teacher.mkdir()
    (teacher / "config.json").write_text(json.dumps(BITCPM4_1B))
    plain = plan_with(model_1b, "finetuning_type=freeze", "bf16=true")
    kd = plan_with(model_1b, "finetuning_type=freeze", "bf16=true", f"teacher={teacher}", "kd_loss=mse")
    assert kd.parts["teacher weights"] == 2 * Shape.from_config(teacher / "config.json").parameters()  # bf16
    assert kd.parts["activations per micro-batch"] > plain.parts["activations per micro-batch"]


def test_a_pattern_matching_nothing_is_a_config_error_from_the_table(model_1b):
    from bitcpm_cli.core.errors import ConfigError

    with pytest.raises(ConfigError, match="'quant_alpha' matches no parameter"):  # no learned scales: no quant_alpha
        plan_with(model_1b, "trainable_keys=[quant_alpha,norm]")


def test_reference_plans_for_the_readme_table():
    from bitcpm_cli.core.training.memory_plan import REFERENCE_MODES, REFERENCE_SHAPES, reference_plan

    assert round(REFERENCE_SHAPES["1b"].parameters() / 1e9, 2) == 1.62
    assert round(REFERENCE_SHAPES["8b"].parameters() / 1e9, 1) == 8.2
    for shape in REFERENCE_SHAPES:
        totals = {mode: reference_plan(shape, mode)["total"] for mode in REFERENCE_MODES}
        full = totals.pop("full")
        assert all(total < full / 2 for total in totals.values()), (shape, totals)
    assert reference_plan("1b", "lora r=16 + MSE teacher")["total"] < 12 * GIB


@pytest.mark.parametrize("overrides", [["finetuning_type=freeze", "freeze_trainable_layers=28"],
                                       ["trainable_keys=[quant_alpha,norm]", "learned_scales=true"],
                                       ["learned_scales=true"], ["finetuning_type=lora"]])
def test_no_zero3_is_suggested_for_the_modes_zero3_refuses(model_1b, overrides):
    """freeze, lora, trainable_keys and learned scales are refused under ZeRO-3 / FSDP (check_modes): a plan that
    does not fit never suggests ZeRO-3 for them (it did: "deepspeed=configs/deepspeed/zero3.json over 4 machines")."""
    if "finetuning_type=lora" in overrides:
        pytest.importorskip("peft")
    for gb in (4, 8, 24):
        plan = plan_memory(model_1b, config(f"max_memory_gb={gb}", *overrides), "single", 1, torch.device("cpu"))
        assert not any("zero3" in suggestion for suggestion in plan.suggestions), (gb, plan.suggestions)
    if overrides == ["learned_scales=true"]:  # full training with learned scales: the light modes still fit
        plan = plan_memory(model_1b, config("max_memory_gb=24", *overrides), "single", 1, torch.device("cpu"))
        assert plan.suggestions == ["trainable_keys=[quant_alpha,norm] learned_scales=true", "finetuning_type=lora",
                                    "finetuning_type=freeze"]


def test_biases_are_in_the_name_table_and_the_counts(tmp_path):
    """attention_bias (q, k, v, o), mlp_bias (gate, up, down) and Qwen2's q, k, v biases are parameters the table
    names (as the model's named_parameters, in order) and counts; trainable_keys [bias] selects exactly them."""
    from transformers import LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from bitcpm_cli.core.quant import QuantScheme, prepare
    from bitcpm_cli.core.training.selection import Choice, trainable_names
    from tests.conftest import tiny_llama_config

    dims = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, tie_word_embeddings=False)
    models = [LlamaForCausalLM(tiny_llama_config(attention_bias=True, mlp_bias=True)),
              LlamaForCausalLM(tiny_llama_config(mlp_bias=True)), Qwen2ForCausalLM(Qwen2Config(**dims))]
    for model in models:
        for scheme in (None, QuantScheme(group_size=32, learned_scales=True)):
            if scheme is not None:
                prepare(model, scheme)
            (tmp_path / "config.json").write_text(model.config.to_json_string())
            shape = Shape.from_config(tmp_path / "config.json")
            table = shape.parameter_table(scheme)
            real = {name: tuple(p.shape) for name, p in model.named_parameters()}
            assert table == real and list(table) == list(real), (model.config.model_type, scheme)
            biases = {n for n in real if n.endswith(".bias")}
            assert biases and trainable_names(table, Choice(trainable_keys=("bias",))) == biases
        assert shape.parameters() == sum(p.numel() for n, p in model.named_parameters() if "quant_alpha" not in n)
