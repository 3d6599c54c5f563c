"""Bad activation settings through the installed `bitcpm` script (the first refusal; the others in-process):
`convert` exits 2 with one `error:` line naming the layer or setting, writes nothing and leaves the input as it was;
`fix-config` reports what cannot be fixed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.fuzz.hostile import snapshot
from tests.helpers import bitcpm_in_process, bitcpm_script, build_tiny_model


@pytest.fixture(scope="module")
def qat(tmp_path_factory) -> Path:
    """A one-layer QAT model whose linears have 64 (q, k, v, o, gate, up) and 128 (down) inputs."""
    return build_tiny_model(tmp_path_factory.mktemp("act") / "qat", kind="qat", group_size=32,
                            config={"num_hidden_layers": 1})


def _variant(qat: Path, folder: Path, **quant) -> Path:
    shutil.copytree(qat, folder)
    config = json.loads((folder / "config.json").read_text())
    config["bitcpm_quant"].update(quant)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _refused(model: Path, out: Path, *extra, installed: bool = False) -> str:
    """Run `convert` (through the installed script, or in-process), check exit 2, nothing written, input unchanged;
    the `error:` line."""
    before = snapshot(model)
    run = (bitcpm_script if installed else bitcpm_in_process)("convert", "-i", model, "-o", out, *extra)
    assert run.returncode == 2, run.stderr
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in run.stderr, run.stderr
    assert not out.exists() and snapshot(model) == before
    return errors[0]


def test_an_unknown_activation_scheme_is_exit_2_naming_the_layer(qat, tmp_path):
    model = _variant(qat, tmp_path / "m", layers={r"mlp\.down_proj": {"activations": "q8_x"}})
    line = _refused(model, tmp_path / "out", installed=True)
    assert r"layers['mlp\\.down_proj']: activations 'q8_x' is not one of" in line and "q8_k" in line


def test_a_block_that_does_not_divide_in_features_is_exit_2_naming_the_layer(qat, tmp_path):
    model = _variant(qat, tmp_path / "m", layers={r"mlp\.down_proj": {"activations": "q8_k"}})
    line = _refused(model, tmp_path / "out")
    assert "model.layers.0.mlp.down_proj: activations q8_k quantize blocks of 256" in line
    assert "in_features 128" in line


def test_a_cann_input_bit_4_is_exit_2_naming_the_layer(qat, tmp_path):
    strategy = tmp_path / "cann.json"
    strategy.write_text(json.dumps({"layer_strategy": {
        "model.layers.0.mlp.up_proj": {"weight": {"bit": 1.58, "group_size": 32}, "input": {"bit": 4}}}}))
    before = strategy.read_bytes()
    line = _refused(qat, tmp_path / "out", "--scheme", strategy)
    assert "layer_strategy['model.layers.0.mlp.up_proj']: input.bit 4 is not supported" in line
    assert strategy.read_bytes() == before


def test_fix_config_names_activations_it_cannot_fix(qat, tmp_path):
    model = _variant(qat, tmp_path / "m", activations="q8_k")
    before = snapshot(model)
    run = bitcpm_script("fix-config", model, "--json")
    assert run.returncode == 1, run.stderr
    report = json.loads(run.stdout)
    assert report["unfixable"] == ["bitcpm_quant.activations"]
    (row,) = [f for f in report["fields"] if f["field"] == "bitcpm_quant.activations"]
    assert "in_features 64 of 6 linear(s)" in row["note"] and "in_features 128 of 1 linear(s)" in row["note"]
    assert snapshot(model) == before
