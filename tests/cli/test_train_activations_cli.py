"""`bitcpm train` / `bitcpm sft` with fake-quantized activations: the W1.58A8 recipe end to end through the installed
script on a tiny model whose linear inputs are multiples of 256, and (in-process) the settings refused before any
weight is read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import bitcpm_in_process, bitcpm_script, build_tiny_model
from tests.integration.test_train import counting_corpus

ROOT = Path(__file__).resolve().parents[2]
A8_RECIPE = ROOT / "configs" / "pretrain" / "tiny-cpu-a8.yaml"
WIDE = dict(hidden_size=256, intermediate_size=256, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
            head_dim=64)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("a8cli")
    build_tiny_model(root / "wide", kind="float", config=WIDE)
    build_tiny_model(root / "narrow", kind="float", config={**WIDE, "intermediate_size": 320})
    # weights that cannot be read: a run refused "before any weight is read" never notices
    (root / "narrow" / "model.safetensors").write_bytes(b"not a safetensors file")
    counting_corpus(root / "count.txt", lines=30)
    return root


def test_the_a8_recipe_trains_end_to_end_and_records_q8_k(models, tmp_path):
    run = bitcpm_script("train", "--config", A8_RECIPE, "--model", models / "wide", "--data", models / "count.txt",
                        "--output-dir", tmp_path / "run", "max_steps=2", "save_steps=2", "batch_size=2", "--json")
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert result["activations"] == "q8_k" and result["scheme"]["activations"] == "q8_k" and result["steps"] == 2
    for folder in ("final", "checkpoint-2"):
        config = json.loads((tmp_path / "run" / folder / "config.json").read_text())
        assert config["bitcpm_quant"]["activations"] == "q8_k", folder


def test_the_flag_sets_it_and_the_table_shows_it(models, tmp_path, invoke):
    result = invoke("train", "--config", A8_RECIPE, "--model", models / "wide", "--data", models / "count.txt",
                    "--output-dir", tmp_path / "run", "max_steps=1", "batch_size=2", "--activations", "int8-token")
    assert result.exit_code == 0, result.output
    assert any(line.split() == ["│", "activations", "│", "int8-token", "│"] for line in result.stdout.splitlines()), \
        result.stdout
    config = json.loads((tmp_path / "run" / "final" / "config.json").read_text())
    assert config["bitcpm_quant"]["activations"] == "int8-token"


def _one_error(run, start: str) -> str:
    assert run.returncode == 2, run.stdout + run.stderr
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {start}"), run.stderr
    assert "Traceback" not in run.stderr and any(line.startswith("hint:") for line in run.stderr.splitlines())
    return errors[0]


def test_an_unknown_scheme_is_exit_2_with_one_line_naming_the_setting(models, tmp_path, invoke):
    run = bitcpm_in_process("train", "--model", models / "wide", "--data", models / "count.txt", "--output-dir",
                            tmp_path / "run", "--device", "cpu", "activations=bogus")
    _one_error(run, "activations: 'bogus' is not one of none, int8-token, q8_k, q8_0")
    assert not (tmp_path / "run").exists()
    result = invoke("sft", "--model", models / "wide", "--data", models / "count.txt", "--output-dir",
                    tmp_path / "run", "--activations", "q8k")
    assert result.exit_code == 2 and "activations: 'q8k' is not one of" in result.stderr
    assert "(did you mean 'q8_k'?)" in result.stderr and not (tmp_path / "run").exists()


def test_q8_k_on_inputs_that_are_no_multiple_of_256_is_refused_before_any_weight_is_read(models, tmp_path, invoke):
    before = {p.name: p.read_bytes() for p in (models / "narrow").iterdir() if p.is_file()}
    run = bitcpm_in_process("train", "--config", A8_RECIPE, "--model", models / "narrow", "--data",
                            models / "count.txt", "--output-dir", tmp_path / "run")
    _one_error(run, "model.layers.0.mlp.down_proj: activations q8_k quantize blocks of 256 input values, which do "
                    "not divide in_features 320")
    assert not (tmp_path / "run").exists()
    assert {p.name: p.read_bytes() for p in (models / "narrow").iterdir() if p.is_file()} == before
    # its weights cannot be read: a setting that fits the model (q8_0, blocks of 32) fails on them, so the refusal
    # above came before any weight was read
    result = invoke("train", "--config", A8_RECIPE, "--model", models / "narrow", "--data", models / "count.txt",
                    "--output-dir", tmp_path / "run", "activations=q8_0", "max_steps=1")
    assert result.exit_code == 2 and "model.safetensors" in result.stderr and "q8_0" not in result.stderr
    assert not (tmp_path / "run").exists()
