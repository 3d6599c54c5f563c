"""Every shipped YAML/JSON in configs/ loads and validates."""

import json
from pathlib import Path

import pytest

from bitcpm_cli.core.quant import QuantScheme, load_scheme_file
from bitcpm_cli.core.training.recipe import TrainConfig, resolve_config
from bitcpm_cli.core.training.sft import SftConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
ALL_FILES = sorted(p for p in CONFIGS.rglob("*") if p.suffix in (".yaml", ".yml", ".json"))
REQUIRED = {"model": "m", "data": ["d.jsonl"], "output_dir": "out"}


def in_folder(name):
    return [p for p in ALL_FILES if p.parent.name == name]


def test_configs_exist():
    assert ALL_FILES, "configs/ holds no YAML or JSON"


# The activation scheme each shipped file sets (a scheme's activation_summary; a recipe's `activations` setting,
# None: the checkpoint's); a file not listed sets none / leaves it unset.
ACTIVATIONS = {"bitnet-b158.yaml": "int8-token", "cann-layer-strategy.yaml": "int8-token", "tiny-cpu-a8.yaml": "q8_k"}


@pytest.mark.parametrize("path", in_folder("quant"), ids=lambda p: p.name)
def test_quant_schemes_load(path):
    scheme = load_scheme_file(path)
    assert isinstance(scheme, QuantScheme)
    assert scheme.for_module("lm_head").quant_type == "none"
    assert scheme.for_module("lm_head").activations == "none"
    assert scheme.activation_summary() == ACTIVATIONS.get(path.name, "none")
    assert scheme.for_module("model.layers.3.mlp.down_proj").activations == ACTIVATIONS.get(path.name, "none")


def test_bitnet_b158_is_ternary_absmean_per_tensor_with_int8_activations_per_token():
    scheme = load_scheme_file(CONFIGS / "quant" / "bitnet-b158.yaml")
    assert (scheme.quant_type, scheme.group_size, scheme.activations, scheme.layers) == (
        "ternary", 0, "int8-token", {})
    assert scheme.to_dict()["activations"] == "int8-token" and not scheme.notes


def test_cann_strategy_quantizes_the_decoder_inputs_at_8_bits_and_says_what_it_cannot_reproduce():
    path = CONFIGS / "quant" / "cann-layer-strategy.yaml"
    scheme = load_scheme_file(path)
    for module in ("model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj", "model.layers.1.mlp.up_proj"):
        assert scheme.for_module(module).activations == "int8-token", module
    assert scheme.for_module("model.layers.0.mlp.down_proj").quant_type == "int4"
    assert len(scheme.notes) == 1 and scheme.notes[0].startswith(
        f"{path}: input.bit 8 in 2 listed layer(s) and in every quantized linear the file does not list")
    assert "calibrated static activation scales" in scheme.notes[0] and "not reproduced" in scheme.notes[0]
    assert "input.bit must stay 16" not in path.read_text()


@pytest.mark.parametrize("path", in_folder("pretrain"), ids=lambda p: p.name)
def test_pretrain_recipes_validate(path):
    config = resolve_config(TrainConfig, path, REQUIRED)
    assert config.activations == ACTIVATIONS.get(path.name)
    assert config.max_steps >= 1 or (config.max_steps == -1 and config.training_args["num_train_epochs"] >= 1)
    if config.deepspeed:
        assert (CONFIGS.parent / config.deepspeed).is_file(), f"{path.name} names a missing DeepSpeed file"


@pytest.mark.parametrize("path", in_folder("sft"), ids=lambda p: p.name)
def test_sft_recipes_validate(path):
    config = resolve_config(SftConfig, path, REQUIRED)
    assert config.activations == ACTIVATIONS.get(path.name)
    assert config.max_length >= 2
    if config.deepspeed:
        assert (CONFIGS.parent / config.deepspeed).is_file(), f"{path.name} names a missing DeepSpeed file"


def test_baichuan2_hyper_parameters():
    config = resolve_config(SftConfig, CONFIGS / "sft" / "bitcpm-1b-npu-baichuan2.yaml", REQUIRED)
    assert (config.lr, config.lr_scheduler, config.adam_beta1, config.adam_beta2, config.adam_epsilon,
            config.weight_decay, config.max_grad_norm, config.bf16, config.gradient_checkpointing,
            config.max_length) == (2e-5, "constant", 0.9, 0.98, 1e-8, 1e-4, 1.0, True, True, 512)


def test_cann_kd_recipe_is_the_cann_kit_s_defaults():
    config = resolve_config(TrainConfig, CONFIGS / "pretrain" / "cann-kd.yaml", REQUIRED)
    assert (config.batch_size, config.grad_accum, config.lr, config.lr_scheduler, config.warmup_steps,
            config.weight_decay, config.trainable_keys, config.kd_loss, config.learned_scales) == (
        2, 4, 1e-4, "cosine", 10, 0.0, ["quant_alpha", "norm"], "mse", True)
    assert config.teacher and config.training_args == {"num_train_epochs": 3} and config.max_steps == -1


def test_lora_recipe_fits_the_1b_shape_on_24_gib(tmp_path):
    pytest.importorskip("peft")
    import torch

    from bitcpm_cli.core.training.memory_plan import plan_memory
    from tests.unit.test_memory_plan import BITCPM4_1B

    config = resolve_config(SftConfig, CONFIGS / "sft" / "bitcpm-1b-lora.yaml", REQUIRED, ["max_memory_gb=24"])
    assert (config.finetuning_type, config.lora_rank, config.lora_target) == ("lora", 16, "all")
    (tmp_path / "config.json").write_text(json.dumps({**BITCPM4_1B, "torch_dtype": "bfloat16"}))
    plan = plan_memory(tmp_path, config, "single", 1, torch.device("cpu"))
    assert plan.fits and plan.total < 12 * 2**30, plan.lines()


@pytest.mark.parametrize("path", in_folder("deepspeed"), ids=lambda p: p.name)
def test_deepspeed_configs_parse(path):
    config = json.loads(path.read_text())
    assert config["zero_optimization"]["stage"] in (1, 2, 3)
    # "auto" lets the Trainer fill batch sizes, accumulation and clipping from bitcpm's settings
    assert config["train_micro_batch_size_per_gpu"] == "auto" and config["gradient_accumulation_steps"] == "auto"


def test_zero3_config_gathers_full_weights_on_save():
    config = json.loads((CONFIGS / "deepspeed" / "zero3.json").read_text())
    assert config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True


@pytest.mark.parametrize("path", in_folder("fsdp"), ids=lambda p: p.name)
def test_fsdp_configs_are_accepted_by_transformers(path, tmp_path):
    from transformers import TrainingArguments

    config = resolve_config(TrainConfig, None, REQUIRED, ["fsdp=full_shard", f"fsdp_config={path}"])
    assert config.training_args == {"fsdp": "full_shard", "fsdp_config": str(path)}
    args = TrainingArguments(output_dir=str(tmp_path), fsdp="full_shard", fsdp_config=str(path), use_cpu=True)
    assert args.fsdp_plugin_args["fsdp_version"] == 2


def test_quickstart_assets():
    import yaml
    from transformers import AutoTokenizer, LlamaConfig

    folder = CONFIGS / "quickstart"
    values = yaml.safe_load((folder / "model.yaml").read_text())
    config = LlamaConfig(**{k: v for k, v in values.items() if k != "model_type"})
    # every linear's input is a multiple of 256, so ternary GGUF blocks fit exactly
    assert config.hidden_size % 256 == 0 and config.intermediate_size % 256 == 0
    assert (config.num_attention_heads * config.head_dim) % 256 == 0
    tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer")
    assert len(tokenizer) <= config.vocab_size
    assert all(len(tokenizer.tokenize(str(n))) == 1 for n in range(200))  # one token a number
    assert tokenizer.chat_template and "<|im_end|>" in tokenizer.get_vocab()
    train = resolve_config(TrainConfig, folder / "train.yaml", REQUIRED)
    # trained with llama.cpp's Q8_K activations (its GGUF is TQ2_0); sft keeps the checkpoint's scheme
    assert train.quant_type == "ternary" and train.activations == "q8_k"
    sft = resolve_config(SftConfig, folder / "sft.yaml", REQUIRED)
    assert sft.max_length >= 16 and sft.activations is None


def test_quickstart_corpus_is_what_the_script_generates():
    import importlib.util
    import random

    spec = importlib.util.spec_from_file_location("assets", CONFIGS.parent / "scripts" / "build_quickstart_assets.py")
    assets = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(assets)
    rng = random.Random(1234)
    assert (CONFIGS / "quickstart" / "corpus.txt").read_text().splitlines() == assets.corpus_lines(rng)
    held_out = {f"continue: {n} {n + 1} {n + 2}" for n in assets.HELD_OUT_NEXT}
    chats = [json.loads(line)["messages"][0]["content"]
             for line in (CONFIGS / "quickstart" / "chat.jsonl").read_text().splitlines()]
    assert not held_out & set(chats)


@pytest.mark.parametrize("path", in_folder("eval"), ids=lambda p: p.name)
def test_eval_tasks_load_offline(path):
    """The shipped lm-evaluation-harness task loads from its folder, and its local data fits it."""
    pytest.importorskip("lm_eval", reason="the eval extra")
    from lm_eval.tasks import TaskManager

    from bitcpm_cli.core.evaluation.tasks import _task_config

    manager = TaskManager(include_path=str(path.parent), include_defaults=False)
    config = _task_config(manager, "bitcpm_counting")
    data = Path(config["dataset_kwargs"]["data_files"]["test"])
    assert data.is_file() and data.parent == path.parent
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    assert len(rows) >= 10 and all(0 <= r["answer"] < len(r["choices"]) == 4 for r in rows)
    assert all(r["choices"][r["answer"]] == str(int(r["context"].split()[-1]) + 1) for r in rows)


def test_every_config_is_covered():
    quickstart = [p for p in ALL_FILES if "quickstart" in p.parts]
    covered = set(in_folder("quant") + in_folder("pretrain") + in_folder("sft") + in_folder("deepspeed")
                  + in_folder("fsdp") + in_folder("eval") + quickstart)
    assert covered == set(ALL_FILES), f"add a loader test for {sorted(set(ALL_FILES) - covered)}"


def test_the_a8_recipe_fits_the_quickstart_model_and_not_the_64_wide_tiny_one():
    import yaml

    from bitcpm_cli.core.errors import ConfigError
    from bitcpm_cli.core.training.memory_plan import Shape
    from bitcpm_cli.core.training.train import check_activation_blocks, resolve_scheme

    config = resolve_config(TrainConfig, CONFIGS / "pretrain" / "tiny-cpu-a8.yaml", REQUIRED)
    scheme = resolve_scheme(config, None, [])
    assert scheme.activations == "q8_k" and scheme.group_size == 256  # one TQ2_0 block a group: an exact GGUF
    values = yaml.safe_load((CONFIGS / "quickstart" / "model.yaml").read_text())
    quickstart = Shape(values["vocab_size"], values["hidden_size"], values["num_hidden_layers"],
                       values["num_attention_heads"], values["num_key_value_heads"], values["head_dim"],
                       values["intermediate_size"], False)
    check_activation_blocks(quickstart.parameter_table(scheme), scheme, Path("quickstart"))
    tiny = Shape(96, 64, 2, 4, 2, 16, 128, False)
    with pytest.raises(ConfigError) as caught:
        check_activation_blocks(tiny.parameter_table(scheme), scheme, Path("tiny"))
    assert len(caught.value.problems) == 14  # every linear of both layers, named
    assert "model.layers.0.mlp.down_proj: activations q8_k quantize blocks of 256 input values, which do not " \
           "divide in_features 128" in caught.value.problems
