"""`finetuning_type: lora` (the adapter inside the fake quantizer) through `bitcpm train` / `bitcpm sft` on a tiny
model: final/ is a merged QAT checkpoint with the trained model's logits, checkpoints hold only the adapter (peft's
files, with bitcpm's marker), `--resume` continues the single-run loss curve, bad settings exit 2 before loading."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import TrainerCallback

from bitcpm_cli.core.training.lora import MARKER
from bitcpm_cli.core.training.recipe import TrainConfig, resolve_config
from bitcpm_cli.core.training.train import latest_complete_checkpoint, train
from tests.helpers import bitcpm_in_process, bitcpm_script
from tests.integration.test_train import RECIPE, setup  # noqa: F401 (setup: a fixture)

ROOT = Path(__file__).resolve().parents[2]
LORA = ("finetuning_type=lora", "lora_rank=4", "lr=0.01", "max_steps=20", "save_steps=5", "logging_steps=1")
PROBE = torch.arange(3, 43).reshape(2, 20) % 90


class TrainedLogits(TrainerCallback):
    """The trained (peft-wrapped) model's logits on PROBE, in float32, once training has ended."""

    logits: torch.Tensor | None = None

    def on_train_end(self, args, state, control, model=None, **kwargs):
        with torch.no_grad():
            self.logits = model(input_ids=PROBE).logits.detach().clone()


@pytest.fixture(scope="module")
def straight(setup):
    """One uninterrupted LoRA run of 20 steps (checkpoints every 5), with the trained model's logits."""
    output = setup / "straight"
    config = resolve_config(TrainConfig, RECIPE, {"model": str(setup / "float"), "data": [str(setup / "count.txt")],
                                                  "output_dir": str(output)}, list(LORA))
    probe = TrainedLogits()
    result = train(config, callbacks=[probe])
    return output, result, probe.logits


def losses(output: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (output / "metrics.jsonl").read_text().splitlines()]


def load_qat(folder: Path):
    """A QAT checkpoint as bitcpm's loaders read it: float32, prepared, its learned scales (if any) loaded."""
    from transformers import AutoModelForCausalLM

    from bitcpm_cli.core.model.learned_scales import load_learned_scales
    from bitcpm_cli.core.quant import QuantScheme, prepare

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    prepare(model, QuantScheme.from_config(model.config))
    load_learned_scales(model, folder)
    return model.eval()


def test_final_is_the_merged_qat_checkpoint_with_the_trained_logits(setup, straight):
    output, result, trained = straight
    assert result.steps == 20 and result.last_loss < result.first_loss
    assert any("LoRA r=4 alpha=8 inside the quantizer on 14 linears" in note for note in result.notes)
    final = output / "final"
    assert sorted(p.name for p in final.glob("*.safetensors")) == ["model.safetensors"]
    assert not (final / "adapter_config.json").exists()
    assert json.loads((final / "config.json").read_text())["bitcpm_quant"]["quant_type"] == "ternary"
    with torch.no_grad():
        assert torch.equal(load_qat(final)(input_ids=PROBE).logits, trained)
        untrained = load_qat_from_float(setup / "float")(input_ids=PROBE).logits
    assert not torch.allclose(untrained, trained, atol=1e-3)  # the merged adapters made a difference
    with safe_open(final / "model.safetensors", "pt") as merged, \
            safe_open(setup / "float" / "model.safetensors", "pt") as original:
        names = set(merged.keys())
        assert names == set(original.keys())
        changed = {n for n in names if not torch.equal(merged.get_tensor(n), original.get_tensor(n))}
    # the adapted linears changed (merged latents); embeddings, norms and lm_head stayed as they were (frozen)
    assert changed == {n for n in names if n.endswith("proj.weight")}


def load_qat_from_float(folder: Path):
    from transformers import AutoModelForCausalLM

    from bitcpm_cli.core.quant import QuantScheme, prepare

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return prepare(model, QuantScheme(group_size=32)).eval()


def test_learned_scales_stay_frozen_at_their_initial_value_and_are_saved(setup, tmp_path):
    from bitcpm_cli.core.quant import QuantScheme
    from bitcpm_cli.core.quant.functional import absmean_scales

    output = tmp_path / "run"
    config = resolve_config(TrainConfig, RECIPE, {"model": str(setup / "float"), "data": [str(setup / "count.txt")],
                                                  "output_dir": str(output)}, [*LORA, "max_steps=4",
                                                                               "learned_scales=true"])
    probe = TrainedLogits()
    train(config, callbacks=[probe])
    final = output / "final"
    assert json.loads((final / "config.json").read_text())["bitcpm_quant"]["learned_scales"] is True
    spec = QuantScheme(group_size=32, learned_scales=True).for_module("model.layers.0.mlp.up_proj")
    with safe_open(final / "model.safetensors", "pt") as merged, \
            safe_open(setup / "float" / "model.safetensors", "pt") as original:
        scales = [n for n in merged.keys() if n.endswith(".quant_alpha")]
        assert len(scales) == 14
        for name in scales:  # the absmean of the input's weight: the initial value, never trained
            weight = original.get_tensor(name.replace(".quant_alpha", ".weight"))
            assert torch.equal(merged.get_tensor(name), absmean_scales(weight, spec)), name
    with torch.no_grad():
        assert torch.equal(load_qat(final)(input_ids=PROBE).logits, probe.logits)


def test_checkpoints_hold_only_the_adapter_with_the_marker(straight):
    output, _, _ = straight
    checkpoint = output / "checkpoint-10"
    assert not list(checkpoint.glob("model*.safetensors"))
    with safe_open(checkpoint / "adapter_model.safetensors", "pt") as adapter:
        keys = list(adapter.keys())
    assert len(keys) == 28 and all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys)
    saved = json.loads((checkpoint / "adapter_config.json").read_text())
    assert saved[MARKER] is True and saved["r"] == 4 and saved["lora_alpha"] == 8 and saved["lora_dropout"] == 0


KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    from transformers import TrainerCallback
    from bitcpm_cli.core.training.recipe import TrainConfig, resolve_config
    from bitcpm_cli.core.training.train import train

    class Kill(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 13:
                os.kill(os.getpid(), signal.SIGKILL)

    model, data, output, *overrides = sys.argv[1:]
    config = resolve_config(TrainConfig, {recipe!r}, {{"model": model, "data": [data], "output_dir": output}},
                            overrides)
    train(config, callbacks=[Kill()])
""")


def test_resume_from_an_adapter_checkpoint_continues_the_loss_curve(setup, straight, tmp_path):
    killed = tmp_path / "killed"
    run = subprocess.run([sys.executable, "-c", KILL_SCRIPT.format(recipe=str(RECIPE)), str(setup / "float"),
                          str(setup / "count.txt"), str(killed), *LORA], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == -9, run.stderr
    assert latest_complete_checkpoint(killed).name == "checkpoint-10"
    # in-process: `train --resume` through the installed script is test_training_hostile.py's kill-before-the-marker
    resumed = bitcpm_in_process("train", "--config", RECIPE, "--model", setup / "float", "--data",
                                setup / "count.txt", "--output-dir", killed, "--resume", *LORA)
    assert resumed.returncode == 0, resumed.stderr
    a, b = losses(straight[0]), losses(killed)
    assert len(a) == len(b) == 20
    assert all(abs(x - y) <= 1e-4 * abs(x) for x, y in zip(a, b)), (a, b)
    with torch.no_grad():
        assert torch.allclose(load_qat(killed / "final")(input_ids=PROBE).logits, straight[2], atol=1e-4)


def test_resume_refuses_a_plain_side_adapter_and_another_rank(setup, straight, tmp_path):
    run = tmp_path / "run"
    checkpoint = run / "checkpoint-10"
    import shutil

    shutil.copytree(straight[0] / "checkpoint-10", checkpoint)
    args = ("train", "--config", RECIPE, "--model", setup / "float", "--data", setup / "count.txt", "--output-dir",
            run, "--resume", *LORA)
    full = bitcpm_in_process(*args[:-len(LORA)], *LORA[2:])
    assert full.returncode == 2 and "holds a LoRA adapter (adapter_config.json) but finetuning_type is full" in \
        full.stderr, full.stderr
    other_rank = bitcpm_in_process(*args, "lora_rank=8")
    assert other_rank.returncode == 2 and "error: --resume: r is 4 in" in other_rank.stderr, other_rank.stderr
    saved = json.loads((checkpoint / "adapter_config.json").read_text())
    del saved[MARKER]
    (checkpoint / "adapter_config.json").write_text(json.dumps(saved))
    side = bitcpm_in_process(*args)
    assert side.returncode == 2 and "is not bitcpm's adapter inside the quantizer" in side.stderr, side.stderr
    for refused in (full, other_rank, side):  # before anything loads; the run folder as it was
        assert "Traceback" not in refused.stderr and "loading the model" not in refused.stdout + refused.stderr
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint-10"]


def test_resume_with_other_quantization_settings_is_refused_before_loading(setup, straight, tmp_path):
    """The run's bitcpm_train_config.yaml records what trains and how it is quantized; --resume with anything else
    (learned scales turned on, another group size or quant type) is one error listing every difference."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(straight[0] / "checkpoint-10", run / "checkpoint-10")
    shutil.copy(straight[0] / "bitcpm_train_config.yaml", run / "bitcpm_train_config.yaml")
    args = ("train", "--config", RECIPE, "--model", setup / "float", "--data", setup / "count.txt", "--output-dir",
            run, "--resume", *LORA)
    learned = bitcpm_in_process(*args, "learned_scales=true", "--group-size", "64")
    other_type = bitcpm_in_process(*args, "--quant-type", "int4")
    head = f"error: --resume: {run} was started with other settings than this run's: "
    assert learned.stderr.startswith(head + "learned_scales None (saved) vs True (now); group_size 32 (saved) vs "
                                            "64 (now)\n"), learned.stderr
    assert other_type.stderr.startswith(head + "quant_type 'ternary' (saved) vs 'int4' (now)\n"), other_type.stderr
    for refused in (learned, other_type):
        assert refused.returncode == 2 and "Traceback" not in refused.stderr
        assert refused.stderr.count("error:") == 1 and refused.stderr.splitlines()[-1].startswith("hint: ")
        assert "loading the model" not in refused.stdout + refused.stderr
    assert sorted(p.name for p in run.iterdir()) == ["bitcpm_train_config.yaml", "checkpoint-10"]


def test_sft_with_lora(setup, tmp_path):
    import random

    rng = random.Random(0)
    with (tmp_path / "chat.jsonl").open("w") as handle:
        for _ in range(40):
            digits = "".join(str(rng.randint(0, 9)) for _ in range(5))
            handle.write(json.dumps({"messages": [{"role": "user", "content": digits},
                                                  {"role": "assistant", "content": "OK."}]}) + "\n")
    run = bitcpm_script("sft", "--config", ROOT / "configs" / "sft" / "tiny-cpu.yaml", "--model", setup / "float",
                        "--data", tmp_path / "chat.jsonl", "--output-dir", tmp_path / "sft", "finetuning_type=lora",
                        "lora_target=q_proj,v_proj", "max_steps=6", "save_steps=3")
    assert run.returncode == 0, run.stderr
    assert json.loads((tmp_path / "sft" / "checkpoint-3" / "adapter_config.json").read_text())[MARKER] is True
    final = tmp_path / "sft" / "final"
    assert not (final / "adapter_config.json").exists() and (final / "model.safetensors").is_file()
    model = load_qat(final)
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "QATLinear"


@pytest.mark.parametrize(("setting", "start"), [
    ("lora_rank=0", "lora_rank: must be a whole number of at least 1"),
    ("lora_target=q_proj,qkv", "lora_target: qkv names no linear module"),
    ("lora_dropout=0.1", "lora_dropout: must be 0"),
])
def test_bad_lora_settings_exit_2_before_loading(setup, tmp_path, setting, start):
    run = bitcpm_in_process("train", "--config", RECIPE, "--model", setup / "float", "--data", setup / "count.txt",
                            "--output-dir", tmp_path / "run", "finetuning_type=lora", setting)
    lines = run.stderr.splitlines()
    assert run.returncode == 2, run.stderr
    assert lines[0].startswith(f"error: {start}") and lines[-1].startswith("hint: "), run.stderr
    assert sum(line.startswith("error:") for line in lines) == 1 and "Traceback" not in run.stderr
    assert "loading the model" not in run.stdout + run.stderr and not (tmp_path / "run").exists()
