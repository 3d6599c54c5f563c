"""Activation schemes on the paths a first review found losing or doubling them (issue 25): re-preparing a hooked
model, saving a fused-on-load model, a packed folder whose recorded scheme does not fit, a fused folder as the KD
teacher or as the student, a fused record naming a layer a packed or GGUF output keeps in full precision, and eval
refusing several models at once."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from bitcpm_cli.core.conversion.convert import convert_checkpoint
from bitcpm_cli.core.errors import ConfigError, QuantError
from bitcpm_cli.core.quant import QuantScheme, fuse, prepare
from bitcpm_cli.core.quant.activations import FUSED_CONFIG_KEY, attach_activations, recorded_activations
from tests.unit.test_engine_activations import models, no_weights_read  # noqa: F401 (models: a fixture)


def edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (folder / "config.json").write_text(json.dumps(config))


def tiny_linears():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.Linear(256, 8))


def test_prepare_replaces_a_hooked_linears_input_quantization_instead_of_adding_to_it():
    model = tiny_linears()
    x = torch.randn(3, 256)
    prepare(model, QuantScheme(group_size=-1, activations="q8_k", modules_to_not_convert=()))
    fuse(model)
    assert recorded_activations(model) == {"0": "q8_k", "1": "q8_k"}
    prepare(model, QuantScheme(group_size=-1, modules_to_not_convert=()))  # the same weights, A16
    assert recorded_activations(model) == {} and not model[0]._forward_pre_hooks
    linear = torch.nn.functional.linear
    with torch.no_grad():  # one A16 forward: no hook left quantizing the input
        hidden = linear(x, model[0].fused_weight(), model[0].bias)
        assert torch.equal(model(x), linear(hidden, model[1].fused_weight(), model[1].bias))
    attach_activations(model, {"0": "none"})
    assert not model[0]._forward_pre_hooks
    with pytest.raises(ConfigError, match="not a linear layer"):
        attach_activations(torch.nn.Sequential(torch.nn.Embedding(4, 256)), {"0": "q8_k"})


def test_a_model_fused_on_load_saves_its_activation_record(models, tmp_path):
    from bitcpm_cli.core.engines.hf import load_for_inference

    loaded = load_for_inference(models / "qat", device="cpu", dtype="float32")
    loaded.model.save_pretrained(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert "bitcpm_quant" not in saved
    assert saved[FUSED_CONFIG_KEY] == json.loads((models / "fused" / "config.json").read_text())[FUSED_CONFIG_KEY]


def test_a_packed_folder_whose_recorded_activations_do_not_fit_is_refused_before_loading(tmp_path, monkeypatch):
    from bitcpm_cli.core.engines.hf import load_for_inference
    from tests.helpers import build_tiny_model

    build_tiny_model(tmp_path / "qat", kind="qat", group_size=-1)  # 64-wide linears
    convert_checkpoint(tmp_path / "qat", tmp_path / "packed", fmt="packed")
    config = json.loads((tmp_path / "packed" / "config.json").read_text())
    config["bitcpm_quant"]["activations"] = "q8_k"  # blocks of 256: no layer fits
    (tmp_path / "packed" / "config.json").write_text(json.dumps(config))
    no_weights_read(monkeypatch)
    with pytest.raises(QuantError) as caught:
        load_for_inference(tmp_path / "packed", device="cpu")
    assert "bitcpm_quant do not fit" in caught.value.message or "do not divide" in caught.value.message


def test_a_fused_teacher_runs_its_recorded_activations(models):
    from bitcpm_cli.core.training.recipe import TrainConfig
    from bitcpm_cli.core.training.train import _load_teacher, check_teacher

    values = json.loads((models / "fused" / "config.json").read_text())
    check_teacher(models / "fused", values)
    student = type("Student", (), {"config": type("C", (), {"vocab_size": values["vocab_size"]})()})()
    notes: list[str] = []
    teacher = _load_teacher(TrainConfig(model=str(models / "qat"), data=["x"], output_dir="o",
                                        teacher=str(models / "fused")), student, torch.device("cpu"), notes)
    assert recorded_activations(teacher) == {name: "q8_k" for name in values[FUSED_CONFIG_KEY]["q8_k"]}
    assert any("the teacher quantizes the input of 7 linears" in note for note in notes)


def test_a_fused_student_trains_with_its_records_scheme_and_saves_it_once(models, tmp_path):
    from bitcpm_cli.core.training.recipe import TrainConfig
    from bitcpm_cli.core.training.train import resolve_scheme

    record = json.loads((models / "fused" / "config.json").read_text())[FUSED_CONFIG_KEY]
    notes: list[str] = []
    config = TrainConfig(model=str(models / "fused"), data=["x"], output_dir="o", group_size=-1)
    scheme = resolve_scheme(config, None, notes, record)
    assert all(scheme.for_module(name).activations == "q8_k" for name in record["q8_k"])
    assert any("record names 7 linears" in note for note in notes)
    # a partial, mixed record: exactly the linears it names, each with its scheme; the others stay full precision
    mixed = {"q8_k": ["model.layers.0.mlp.up_proj"], "q8_0": ["model.layers.0.mlp.down_proj"]}
    scheme = resolve_scheme(config, None, [], mixed)
    assert [scheme.for_module(f"model.layers.0.mlp.{m}").activations for m in ("up_proj", "down_proj", "gate_proj")] \
        == ["q8_k", "q8_0", "none"]
    chosen = TrainConfig(model=str(models / "fused"), data=["x"], output_dir="o", group_size=-1, activations="none")
    assert resolve_scheme(chosen, None, [], record).activations == "none"
    bitnet = Path(__file__).resolve().parents[2] / "configs" / "quant" / "bitnet-b158.yaml"
    notes = []
    from_file = TrainConfig(model=str(models / "fused"), data=["x"], output_dir="o", scheme=str(bitnet))
    assert resolve_scheme(from_file, None, notes, record).activations == "int8-token"  # the file the user named wins
    assert any("replace the fused input's bitcpm_activations record" in note for note in notes)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(models / "fused")
    prepare(model, QuantScheme(group_size=-1, activations="q8_k"))
    assert not hasattr(model.config, FUSED_CONFIG_KEY)  # bitcpm_quant says it now: no second, stale record


def test_full_precision_training_of_a_fused_a8_model_drops_its_record(models, tmp_path):
    from bitcpm_cli.core.training.recipe import TrainConfig
    from bitcpm_cli.core.training.train import train

    (tmp_path / "t.txt").write_text("\n".join("a b c d e f g h" for _ in range(40)) + "\n")
    result = train(TrainConfig(model=str(models / "fused"), data=[str(tmp_path / "t.txt")],
                               output_dir=str(tmp_path / "run"), quant_type="none", max_steps=1, batch_size=2,
                               block_size=16, save_steps=100, device="cpu"))
    assert any("record is dropped (full precision)" in note for note in result.notes)
    assert FUSED_CONFIG_KEY not in json.loads((tmp_path / "run" / "final" / "config.json").read_text())


def test_what_ran_names_the_quantized_linears_left_at_full_precision(tmp_path):
    from bitcpm_cli.core.engines.hf import load_for_inference
    from tests.unit.test_engine_activations import a8_qat_model

    a8_qat_model(tmp_path / "qat")
    edit = json.loads((tmp_path / "qat" / "config.json").read_text())
    edit["bitcpm_quant"]["layers"] = {"mlp\\.down_proj": {"activations": "none"}}
    (tmp_path / "qat" / "config.json").write_text(json.dumps(edit))
    assert load_for_inference(tmp_path / "qat", device="cpu").info["activations"] == "q8_k (none in 1 linear)"


def test_compare_reports_llama_cpps_activations_without_calling_them_a_mismatch(tmp_path):
    from bitcpm_cli.core.evaluation.compare import compare_results
    from bitcpm_cli.core.formats.results import results_document

    result = {"id": 0, "prompt": "a", "token_ids": [5], "text": "x", "num_tokens": 1}
    paths = []
    for name, activations in (("hf", "q8_k"), ("gguf", "llama.cpp: q8_k (TQ2_0), f16 (F16)")):
        model = {"path": "m", "dtype": "float32", "format": "qat", "activations": activations}
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(json.dumps(results_document(model, {}, {}, [result], 1.0, [])))
    notes = compare_results(*paths).notes
    assert "activations: A ran q8_k, B ran llama.cpp: q8_k (TQ2_0), f16 (F16)" in notes
    assert not any("differ" in note and "activation" in note for note in notes)


def test_a_cann_w16a8_entry_is_refused():
    from bitcpm_cli.core.quant.scheme import scheme_from_strategy

    strategy = {"model.layers.0.mlp.up_proj": {"weight": {"bit": 1.58, "group_size": 128}, "input": {"bit": 8}},
                "lm_head": {"weight": {"bit": 16}, "input": {"bit": 8}}}
    with pytest.raises(ConfigError, match="quant_type none keeps this one in full precision"):
        scheme_from_strategy(strategy, "dopt_config.json")


def test_a_record_naming_a_layer_the_conversion_keeps_in_full_precision_is_a_warning(models, tmp_path):
    fused = tmp_path / "fused"
    shutil.copytree(models / "fused", fused)
    record = json.loads((fused / "config.json").read_text())[FUSED_CONFIG_KEY]
    edit_config(fused, **{FUSED_CONFIG_KEY: {"q8_k": record["q8_k"] + ["lm_head"]}})
    result = convert_checkpoint(fused, tmp_path / "packed", fmt="packed")
    assert any("1 linear(s) of the fused input's bitcpm_activations record are not quantized linears" in w
               and "lm_head" in w for w in result.warnings)


def test_a_broken_record_names_its_file_even_alone(models, tmp_path):
    from bitcpm_cli.core.engines.hf import load_for_inference

    fused = tmp_path / "fused"
    shutil.copytree(models / "fused", fused)
    edit_config(fused, **{FUSED_CONFIG_KEY: {"q8_k": "lm_head"}})
    with pytest.raises(ConfigError) as caught:
        load_for_inference(fused, device="cpu")
    assert str(fused / "config.json") in caught.value.message and FUSED_CONFIG_KEY in caught.value.message


def test_eval_names_every_model_whose_activations_cannot_run(models, tmp_path):
    from bitcpm_cli.core.evaluation.perplexity import plan_eval

    broken = []
    for name in ("one", "two"):
        fused = tmp_path / name
        shutil.copytree(models / "fused", fused)
        edit_config(fused, **{FUSED_CONFIG_KEY: {"q4": ["model.layers.0.mlp.up_proj"]}})
        broken.append(fused)
    (tmp_path / "t.txt").write_text("a b c\n")
    with pytest.raises(QuantError) as caught:
        plan_eval([models / "fused", *broken], tmp_path / "t.txt", context=16)
    assert "2 models cannot be run as given" in caught.value.message
    assert [str(b) in " ".join(caught.value.problems) for b in broken] == [True, True]
