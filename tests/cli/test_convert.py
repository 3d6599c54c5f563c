import json

import torch
from safetensors.torch import load_file

from bitcpm_cli.core.quant import LayerQuant, fake_quantize
from tests.unit.test_convert import make_qat


def test_help(invoke):
    result = invoke("convert", "--help")
    assert result.exit_code == 0
    for flag in ("--input", "--input-bin", "--output", "--quant-type", "--group-size", "--format", "--dtype", "--verify"):
        assert flag in result.output


def test_seed_command_line_bin_to_bin(invoke, tmp_path):
    model = make_qat(tmp_path / "qat", group_size=-1)
    torch.save(model.state_dict(), tmp_path / "ckpt.bin")
    result = invoke("convert", "--input_bin", tmp_path / "ckpt.bin", "--output", tmp_path / "fused.bin",
                    "--quant_type", "ternary", "--group_size", "-1")
    assert result.exit_code == 0, result.output
    assert "wrote" in result.output
    fused = torch.load(tmp_path / "fused.bin", weights_only=True)
    name = "model.layers.0.self_attn.o_proj.weight"
    assert torch.equal(fused[name], fake_quantize(model.state_dict()[name], LayerQuant("ternary", -1), torch.bfloat16))


def test_folder_packed_verify_json(invoke, tmp_path):
    make_qat(tmp_path / "qat")
    result = invoke("convert", "--input", tmp_path / "qat", "--output", tmp_path / "packed", "--format", "packed",
                    "--verify", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["format"] == "packed" and report["verify"]["ok"] is True
    assert report["linear_ratio_vs_bf16"] >= 7
    assert set(report["verify"]["zero_fraction_per_layer"]) == {"0", "1"}
    back = invoke("convert", "-i", tmp_path / "packed", "-o", tmp_path / "fused", "--verify")
    assert back.exit_code == 0 and "input is packed" in back.output
    assert "smaller than bf16" not in back.stdout  # the table shows the ratio only for linears written smaller
    table = invoke("convert", "-i", tmp_path / "qat", "-o", tmp_path / "packed2", "--format", "packed")
    assert table.exit_code == 0 and f"{report['linear_ratio_vs_bf16']:.2f}x smaller than bf16" in table.stdout
    assert "model.layers.1.mlp.down_proj.weight" in load_file(tmp_path / "fused" / "model.safetensors")


def test_group_override_warning_is_printed(invoke, tmp_path):
    make_qat(tmp_path / "qat")
    result = invoke("convert", "-i", tmp_path / "qat", "-o", tmp_path / "fused", "--group-size", "-1")
    assert result.exit_code == 0
    assert "WARNING:" in result.stderr and "NOT match its training forward pass" in result.stderr


def test_bad_input_exit_2_nothing_written(invoke, tmp_path):
    result = invoke("convert", "-i", tmp_path / "missing", "-o", tmp_path / "out")
    assert result.exit_code == 2
    assert result.stderr.startswith("error: no such file or directory") and "hint:" in result.stderr
    assert not (tmp_path / "out").exists()


def test_output_equal_input_exit_2(invoke, tmp_path):
    make_qat(tmp_path / "qat")
    before = sorted(p.name for p in (tmp_path / "qat").iterdir())
    result = invoke("convert", "-i", tmp_path / "qat", "-o", tmp_path / "qat")
    assert result.exit_code == 2 and "is the input" in result.stderr
    assert sorted(p.name for p in (tmp_path / "qat").iterdir()) == before


def test_bad_format_and_size(invoke, tmp_path):
    make_qat(tmp_path / "qat")
    assert invoke("convert", "-i", tmp_path / "qat", "-o", tmp_path / "o", "--format", "gguf").exit_code == 2
    bad = invoke("convert", "-i", tmp_path / "qat", "-o", tmp_path / "o", "--max-shard-size", "lots")
    assert bad.exit_code == 2 and "is not a size" in bad.stderr
    assert not (tmp_path / "o").exists()


def test_gguf_without_the_gguf_extra_is_exit_2_naming_the_extra(invoke, tmp_path, monkeypatch):
    import sys

    make_qat(tmp_path / "qat")
    before = sorted(p.name for p in (tmp_path / "qat").iterdir())
    monkeypatch.setitem(sys.modules, "gguf", None)  # not installed (as on a machine without the extra)
    result = invoke("convert", "-i", tmp_path / "qat", "-o", tmp_path / "m.gguf", "--format", "gguf")
    assert result.exit_code == 2, result.output
    assert "needs gguf-py" in result.stderr and "pip install -e '.[gguf]'" in result.stderr
    assert not (tmp_path / "m.gguf").exists() and sorted(p.name for p in (tmp_path / "qat").iterdir()) == before


def test_dtype_with_gguf_is_refused_not_dropped(invoke, tmp_path):
    """A GGUF's dtype follows --gguf-embeddings (float16 fused, or bfloat16 with bf16): --dtype is refused, naming
    that, before anything is written; fused and packed outputs keep their bfloat16 default."""
    make_qat(tmp_path / "qat")
    before = sorted(p.name for p in (tmp_path / "qat").iterdir())
    result = invoke("convert", "-i", tmp_path / "qat", "-o", tmp_path / "m.gguf", "--format", "gguf", "--dtype",
                    "bfloat16")
    assert result.exit_code == 2, result.output
    assert "--dtype bfloat16 does not apply to --format gguf" in result.stderr and "--gguf-embeddings bf16" in \
        result.stderr
    assert not (tmp_path / "m.gguf").exists() and sorted(p.name for p in (tmp_path / "qat").iterdir()) == before
    assert invoke("convert", "-i", tmp_path / "qat", "-o", tmp_path / "fused").exit_code == 0
    assert {t.dtype for t in load_file(tmp_path / "fused" / "model.safetensors").values()} == {torch.bfloat16}


def test_nan_latent_weight_is_exit_2_naming_the_layer_and_nothing_written(invoke, tmp_path):
    from safetensors.torch import save_file

    make_qat(tmp_path / "qat")
    weights = load_file(tmp_path / "qat" / "model.safetensors")
    weights["model.layers.1.self_attn.q_proj.weight"][0, 0] = float("inf")
    save_file(weights, tmp_path / "qat" / "model.safetensors", metadata={"format": "pt"})
    before = {p.name: p.read_bytes() for p in (tmp_path / "qat").iterdir()}
    result = invoke("convert", "-i", tmp_path / "qat", "-o", tmp_path / "fused", "--verify")
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert lines == ["error: model.layers.1.self_attn.q_proj: the weight holds NaN or infinite values; its fused "
                     "weight would be NaN"]
    assert "hint:" in result.output and "Traceback" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["qat"]
    assert {p.name: p.read_bytes() for p in (tmp_path / "qat").iterdir()} == before
