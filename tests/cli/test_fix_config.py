import json

from tests.helpers import BITCPM_1B, bitcpm_1b_published_config, llama_shapes, write_model_dir


def one_b(tmp_path):
    return write_model_dir(tmp_path / "BitCPM4-CANN-1B", bitcpm_1b_published_config(), llama_shapes(**BITCPM_1B))


def test_help(invoke):
    result = invoke("fix-config", "--help")
    assert result.exit_code == 0
    for flag in ("--write", "--output", "--head-dim", "--json"):
        assert flag in result.output


def test_mismatch_exits_1_with_table_and_writes_nothing(invoke, tmp_path):
    model = one_b(tmp_path)
    before = sorted(p.name for p in model.iterdir())
    result = invoke("fix-config", model)
    assert result.exit_code == 1, result.output
    assert "hidden_size" in result.output and "2560" in result.output and "2048" in result.output
    assert "mismatch" in result.output and "--write" in result.output
    assert sorted(p.name for p in model.iterdir()) == before
    # exit 1 goes through the one error map: the verdict on stderr, the report alone on stdout
    assert result.stderr.startswith("error: config.json disagrees with the weights in 4 field(s): ")
    assert "hint: run again with --write" in result.stderr and "error:" not in result.stdout


def test_json_report(invoke, tmp_path):
    result = invoke("fix-config", one_b(tmp_path), "--json")
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert report["schema"] == "bitcpm.fix-config/1" and report["consistent"] is False
    assert report["changes"] == {"hidden_size": 2048, "num_hidden_layers": 28, "num_attention_heads": 16,
                                 "intermediate_size": 6144}
    assert report["weights"]["format"] == "safetensors"


def test_write_repairs_then_check_passes(invoke, tmp_path):
    model = one_b(tmp_path)
    original = (model / "config.json").read_bytes()
    result = invoke("fix-config", model, "--write")
    assert result.exit_code == 0, result.output
    assert "4 field(s) fixed" in result.output
    assert (model / "config.json.bak").read_bytes() == original
    again = invoke("fix-config", model)
    assert again.exit_code == 0 and "agrees with the weights" in again.output


def test_output_elsewhere_leaves_model_untouched(invoke, tmp_path):
    model = one_b(tmp_path)
    original = (model / "config.json").read_bytes()
    result = invoke("fix-config", model, "--output", tmp_path / "fixed.json", "--json")
    assert result.exit_code == 0
    assert json.loads((tmp_path / "fixed.json").read_text())["hidden_size"] == 2048
    assert (model / "config.json").read_bytes() == original
    assert not (model / "config.json.bak").exists()


def test_unfixable_rope_keeps_exit_1_after_write(invoke, tmp_path):
    config = bitcpm_1b_published_config()
    config["rope_scaling"]["long_factor"] = [1.0] * 48
    model = write_model_dir(tmp_path / "m", config, llama_shapes(**BITCPM_1B))
    result = invoke("fix-config", model, "--write")
    assert result.exit_code == 1
    assert "cannot fix" in result.output and "long_factor" in result.output
    assert json.loads((model / "config.json").read_text())["hidden_size"] == 2048


def test_bad_input_exit_2_nothing_written(invoke, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    result = invoke("fix-config", empty, "--write")
    assert result.exit_code == 2
    assert result.stderr.startswith("error: no weights found") and "hint:" in result.stderr
    assert "Traceback" not in result.output
    assert sorted(p.name for p in empty.iterdir()) == ["config.json"]


def test_config_not_json_exit_2(invoke, tmp_path):
    model = one_b(tmp_path)
    (model / "config.json").write_text("{oops")
    result = invoke("fix-config", model, "--write")
    assert result.exit_code == 2 and "not valid JSON" in result.stderr
    assert not (model / "config.json.bak").exists()


def test_write_and_output_together_is_a_usage_error(invoke, tmp_path):
    result = invoke("fix-config", one_b(tmp_path), "--write", "--output", tmp_path / "x.json")
    assert result.exit_code == 2 and not (tmp_path / "x.json").exists()


def test_ambiguous_head_dim_then_flag(invoke, tmp_path):
    config = bitcpm_1b_published_config()
    del config["head_dim"]
    config["num_key_value_heads"] = 1  # 256 / 1 = 256 vs 2048 / 32 heads = 64: the config contradicts itself
    del config["rope_scaling"]
    model = write_model_dir(tmp_path / "m", config, llama_shapes(**BITCPM_1B))
    result = invoke("fix-config", model)
    assert result.exit_code == 2 and "cannot tell head_dim" in result.stderr and "--head-dim" in result.stderr
    fixed = invoke("fix-config", model, "--head-dim", "128", "--write")
    assert fixed.exit_code == 0, fixed.output
    written = json.loads((model / "config.json").read_text())
    assert (written["num_key_value_heads"], written["num_attention_heads"]) == (2, 16)
