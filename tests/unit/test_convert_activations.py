"""Activation schemes through `convert`, GGUF export and fix-config's check (issue 25): a fused output records them
under `bitcpm_activations`, a packed one keeps them in its bitcpm_quant, a GGUF export says when llama.cpp runs its
blocks with other activations than training, and a config whose activation schemes do not fit is reported."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from bitcpm_cli.core.conversion.convert import convert_checkpoint
from bitcpm_cli.core.errors import ConfigError
from bitcpm_cli.core.quant import QuantScheme, prepare
from bitcpm_cli.core.quant.activations import FUSED_CONFIG_KEY, attach_activations, read_fused_record
from tests.helpers import build_tiny_model

TOKENIZER = Path(__file__).resolve().parents[2] / "configs" / "quickstart" / "tokenizer"
# Every linear's in_features a multiple of 256 (q8_k blocks and TQ2_0 blocks fit), the quickstart tokenizer.
SHAPES = dict(vocab_size=512, hidden_size=256, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
              head_dim=64)
LINEARS = sorted(f"model.layers.{i}.{m}" for i in range(2) for m in (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
    "mlp.down_proj"))


def with_activations(root: Path, name: str, activations: str | None = None, layers: dict | None = None) -> Path:
    """A copy of the A16 QAT model whose bitcpm_quant quantizes activations (the latent weights are the same)."""
    folder = root / name
    if not folder.exists():
        shutil.copytree(root / "qat16", folder)
        config = json.loads((folder / "config.json").read_text())
        if activations is not None:
            config["bitcpm_quant"]["activations"] = activations
        if layers is not None:
            config["bitcpm_quant"]["layers"] = layers
        (folder / "config.json").write_text(json.dumps(config))
    return folder


def config_of(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("activations")
    build_tiny_model(root / "qat16", kind="qat", group_size=-1, config=SHAPES, tokenizer=TOKENIZER)
    with_activations(root, "qat8k", "q8_k")
    convert_checkpoint(root / "qat8k", root / "fused8k", dtype="float32")
    return root


def test_a_fused_output_records_the_activation_scheme_of_every_quantized_linear(models, tmp_path):
    config = config_of(models / "fused8k")
    assert config[FUSED_CONFIG_KEY] == {"q8_k": LINEARS} and "bitcpm_quant" not in config
    convert_checkpoint(models / "qat16", tmp_path / "a16")
    assert FUSED_CONFIG_KEY not in config_of(tmp_path / "a16")  # absent when every input is full precision


def test_the_fused_weights_with_their_record_compute_the_qat_forward(models):
    from transformers import LlamaForCausalLM

    ids = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(1))
    qat = LlamaForCausalLM.from_pretrained(models / "qat8k", dtype=torch.float32).eval()
    prepare(qat, QuantScheme.from_config(config_of(models / "qat8k")))
    fused = LlamaForCausalLM.from_pretrained(models / "fused8k", dtype=torch.float32).eval()
    with torch.no_grad():
        expected, a16 = qat(ids).logits, fused(ids).logits
        shapes = {n: tuple(p.shape) for n, p in fused.named_parameters()}
        schemes = read_fused_record(config_of(models / "fused8k")[FUSED_CONFIG_KEY], shapes, "config.json")
        assert attach_activations(fused, schemes) == 14
        got = fused(ids).logits
    assert torch.equal(got, expected)
    assert not torch.equal(a16, expected)  # the record matters: without it the activations stay full precision


def test_a_packed_output_keeps_the_activations_and_unpacks_to_the_same_record(models, tmp_path):
    layers = {r"mlp\.down_proj": {"activations": "q8_0"}}
    qat = with_activations(models, "qat_mixed", "q8_k", layers)
    convert_checkpoint(qat, tmp_path / "packed", fmt="packed")
    block = config_of(tmp_path / "packed")["bitcpm_quant"]
    assert block["activations"] == "q8_k" and block["layers"] == layers and block["packed"] is True
    convert_checkpoint(tmp_path / "packed", tmp_path / "unpacked")
    convert_checkpoint(qat, tmp_path / "fused")
    record = config_of(tmp_path / "fused")[FUSED_CONFIG_KEY]
    assert record == {"q8_0": [n for n in LINEARS if n.endswith("down_proj")],
                      "q8_k": [n for n in LINEARS if not n.endswith("down_proj")]}
    assert config_of(tmp_path / "unpacked")[FUSED_CONFIG_KEY] == record


def test_a_fused_input_carries_its_record_into_fused_and_packed_outputs(models, tmp_path):
    convert_checkpoint(models / "fused8k", tmp_path / "bf16", dtype="bfloat16")
    assert config_of(tmp_path / "bf16")[FUSED_CONFIG_KEY] == {"q8_k": LINEARS}
    convert_checkpoint(models / "fused8k", tmp_path / "packed", fmt="packed")
    packed = QuantScheme.from_config(config_of(tmp_path / "packed"))
    assert {n: packed.for_module(n).activations for n in LINEARS} == dict.fromkeys(LINEARS, "q8_k")


def test_a_qat_checkpoint_whose_weights_are_already_fused_records_its_schemes_activations(models, tmp_path):
    folder = tmp_path / "fused_qat"
    shutil.copytree(models / "fused8k", folder)
    config = config_of(folder)
    del config[FUSED_CONFIG_KEY]
    config["bitcpm_quant"] = {"quant_type": "ternary", "group_size": -1, "activations": "int8-token"}
    (folder / "config.json").write_text(json.dumps(config))
    result = convert_checkpoint(folder, tmp_path / "out")
    assert result.input_kind == "fused" and config_of(tmp_path / "out")[FUSED_CONFIG_KEY] == {"int8-token": LINEARS}


def test_an_invalid_record_in_a_fused_input_is_refused_before_any_weight_is_read(models, tmp_path, monkeypatch):
    from bitcpm_cli.core.conversion import plan

    fused = tmp_path / "fused"
    shutil.copytree(models / "fused8k", fused)
    config = config_of(fused)
    config[FUSED_CONFIG_KEY] = {"q8_x": ["model.layers.0.mlp.up_proj"], "q8_k": ["model.layers.0.mlp.nope"]}
    (fused / "config.json").write_text(json.dumps(config))

    def no_reading(*args, **kwargs):
        raise AssertionError("a weight was read")

    monkeypatch.setattr(plan.TensorReader, "__getitem__", no_reading)
    with pytest.raises(ConfigError) as info:
        convert_checkpoint(fused, tmp_path / "out")
    problems = " ".join(info.value.problems)
    assert "'q8_x' is not one of" in problems and "model.layers.0.mlp.nope" in problems
    assert not (tmp_path / "out").exists()


def test_a_single_file_output_says_it_cannot_record_the_activations(models, tmp_path):
    result = convert_checkpoint(models / "qat8k", tmp_path / "m.safetensors")
    (note,) = [n for n in result.notes if n.startswith("activations:")]
    assert "14 linear(s)" in note and "q8_k" in note and "no config.json" in note
    assert result.activations == {"q8_k": 14}
    result = convert_checkpoint(models / "qat16", tmp_path / "a16.bin")
    assert not [n for n in result.notes if n.startswith("activations:")] and result.activations == {}


def test_a_cann_strategy_files_note_is_among_the_convert_notes(models, tmp_path):
    strategy = {"layer_strategy": {n: {"weight": {"bit": 1.58, "group_size": -1}, "input": {"bit": 8}}
                                   for n in LINEARS}}
    (tmp_path / "cann.json").write_text(json.dumps(strategy))
    result = convert_checkpoint(models / "qat16", tmp_path / "out", scheme_file=tmp_path / "cann.json")
    assert any("input.bit 8 in 14 listed layer(s)" in n and "not reproduced" in n for n in result.notes)
    assert config_of(tmp_path / "out")[FUSED_CONFIG_KEY] == {"int8-token": LINEARS}


# ---- GGUF --------------------------------------------------------------------------------------------------------
def _fields(path: Path) -> set[str]:
    import gguf

    return set(gguf.GGUFReader(str(path)).fields)


def test_gguf_export_notes_activations_that_differ_from_llama_cpps_and_records_nothing(models, tmp_path):
    pytest.importorskip("gguf")
    from bitcpm_cli.core.conversion.gguf.export import export_gguf

    a16 = export_gguf(models / "qat16", tmp_path / "a16.gguf", gguf_type="tq2_0")
    (note,) = [n for n in a16.notes if n.startswith("activations:")]
    assert note.startswith("activations: 14 linear(s) were trained with activations none, and llama.cpp multiplies "
                           "their TQ2_0 blocks by Q8_K activations: the GGUF runs differently from training")
    assert "train with activations q8_k" in note
    a8 = export_gguf(models / "fused8k", tmp_path / "a8.gguf", gguf_type="tq2_0")  # the record of a fused input
    assert not [n for n in a8.notes if n.startswith("activations:")]
    assert _fields(tmp_path / "a8.gguf") == _fields(tmp_path / "a16.gguf")  # no metadata key llama.cpp would ignore
    assert not [f for f in _fields(tmp_path / "a8.gguf") if "activation" in f or "bitcpm" in f]


def test_gguf_auto_gives_a_q8_0_model_the_blocks_that_multiply_q8_0_activations(models, tmp_path):
    pytest.importorskip("gguf")
    from bitcpm_cli.core.conversion.gguf.export import export_gguf

    qat = with_activations(models, "qat8_0", "q8_0")
    auto = export_gguf(qat, tmp_path / "auto.gguf", gguf_type="auto")
    assert auto.tensor_types.get("Q4_0") == 14 and "TQ2_0" not in auto.tensor_types and auto.exact
    assert not [n for n in auto.notes if n.startswith("activations:")]
    tq2 = export_gguf(qat, tmp_path / "tq2.gguf", gguf_type="tq2_0")
    (note,) = [n for n in tq2.notes if n.startswith("activations:")]
    assert "trained with activations q8_0" in note and "export with --gguf-type auto" in note
    a16 = export_gguf(models / "qat16", tmp_path / "a16.gguf", gguf_type="auto")  # unchanged: the smallest type
    assert a16.tensor_types.get("TQ2_0") == 14


# ---- fix-config --------------------------------------------------------------------------------------------------
def test_fix_config_reports_activations_that_do_not_fit_as_unfixable(tmp_path):
    from bitcpm_cli.core.model.config_check import check_config, require_consistent_config

    build_tiny_model(tmp_path / "qat", kind="qat", group_size=32)  # in_features 64 and 128
    config = config_of(tmp_path / "qat")
    config["bitcpm_quant"]["layers"] = {r"mlp\.down_proj": {"activations": "q8_k"}}
    (tmp_path / "qat" / "config.json").write_text(json.dumps(config))
    (row,) = [c for c in check_config(tmp_path / "qat").checks if c.field == "bitcpm_quant.activations"]
    assert row.verdict == "unfixable" and row.config == "none (q8_k in some layers)"
    assert ("do not divide in_features 128 of 2 linear(s): model.layers.0.mlp.down_proj, model.layers.1.mlp.down_proj"
            in row.note) and "not fixable" in row.note
    assert require_consistent_config(tmp_path / "qat") is not None  # the converter refuses it itself, naming layers


def test_fix_config_reports_every_problem_of_a_fused_record(models, tmp_path):
    from bitcpm_cli.core.model.config_check import check_config

    fused = tmp_path / "fused"
    shutil.copytree(models / "fused8k", fused)
    config = config_of(fused)
    config[FUSED_CONFIG_KEY] = {"q8_k": ["model.norm", "model.layers.9.mlp.up_proj"], "int4": ["lm_head"]}
    (fused / "config.json").write_text(json.dumps(config))
    report = check_config(fused)
    (row,) = [c for c in report.checks if c.field == FUSED_CONFIG_KEY]
    assert row.verdict == "unfixable" and not report.consistent
    for problem in ("'int4' is not one of", "'model.norm' is not a linear", "'model.layers.9.mlp.up_proj' is not"):
        assert problem in row.note
    (row,) = [c for c in check_config(models / "fused8k").checks if c.field == FUSED_CONFIG_KEY]
    assert row.verdict == "ok"
