import json

import pytest

from bitcpm_cli.core.model.checkpoint import read_tensor_specs
from bitcpm_cli.core.model.config_check import (
    UnsupportedArchitecture,
    check_config,
    require_consistent_config,
    write_fixed_config,
)
from bitcpm_cli.core.errors import ConfigError, InputError

from tests.helpers import BITCPM_1B, bitcpm_1b_published_config, llama_shapes, write_model_dir

SMALL = dict(hidden=64, layers=3, heads=4, kv_heads=2, head_dim=16, intermediate=128, vocab=96)


def small_config(**changes):
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
              "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
              "intermediate_size": 128, "vocab_size": 96, "torch_dtype": "bfloat16", "tie_word_embeddings": False}
    config.update(changes)
    return {k: v for k, v in config.items() if v is not None}


def verdicts(report):
    return {c.field: (c.config, c.weights, c.verdict) for c in report.checks}


def test_bitcpm_1b_published_mismatch_found_and_fixed(tmp_path):
    model = write_model_dir(tmp_path / "1b", bitcpm_1b_published_config(), llama_shapes(**BITCPM_1B))
    report = check_config(model)
    v = verdicts(report)
    assert v["hidden_size"] == (2560, 2048, "mismatch")
    assert v["num_hidden_layers"] == (32, 28, "mismatch")
    assert v["num_attention_heads"] == (32, 16, "mismatch")
    assert v["intermediate_size"] == (10240, 6144, "mismatch")
    assert v["num_key_value_heads"] == (2, 2, "ok")
    assert v["head_dim"] == (128, 128, "ok")
    assert v["vocab_size"] == (73448, 73448, "ok")
    assert v["tie_word_embeddings"] == (False, False, "ok")
    assert v["torch_dtype"] == ("bfloat16", "bfloat16", "ok")
    assert v["rope_scaling.long_factor length"] == (64, 64, "ok")
    assert not report.consistent
    assert {c.field for c in report.to_fix} == {"hidden_size", "num_hidden_layers", "num_attention_heads",
                                                 "intermediate_size"}
    assert report.parameters > 1_600_000_000
    write_fixed_config(report)
    fixed = json.loads((model / "config.json").read_text())
    assert (fixed["hidden_size"], fixed["num_hidden_layers"], fixed["num_attention_heads"],
            fixed["intermediate_size"]) == (2048, 28, 16, 6144)
    assert fixed["scale_emb"] == 12 and fixed["rope_scaling"] == bitcpm_1b_published_config()["rope_scaling"]
    assert list(fixed) == list(bitcpm_1b_published_config())  # field order kept
    assert json.loads((model / "config.json.bak").read_text()) == bitcpm_1b_published_config()
    assert check_config(model).consistent


def test_fixed_config_loads_in_transformers(tmp_path):
    from transformers import AutoConfig

    model = write_model_dir(tmp_path / "1b", bitcpm_1b_published_config(), llama_shapes(**BITCPM_1B))
    write_fixed_config(check_config(model))
    config = AutoConfig.from_pretrained(model)
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (2048, 28, 16)


def test_backup_is_byte_identical_and_never_overwritten(tmp_path):
    model = write_model_dir(tmp_path / "m", small_config(hidden_size=80), llama_shapes(**SMALL))
    original = (model / "config.json").read_bytes()
    (model / "config.json.bak").write_bytes(b"an older backup")
    report = write_fixed_config(check_config(model))
    assert report.backup.endswith("config.json.bak.1")
    assert (model / "config.json.bak").read_bytes() == b"an older backup"
    assert (model / "config.json.bak.1").read_bytes() == original


def test_sharded_safetensors_with_index(tmp_path):
    model = write_model_dir(tmp_path / "m", small_config(num_hidden_layers=4), llama_shapes(**SMALL), shards=3)
    files, specs = read_tensor_specs(model)
    assert len(files.files) == 3 and files.index is not None
    report = check_config(model)
    assert verdicts(report)["num_hidden_layers"] == (4, 3, "mismatch")


@pytest.mark.parametrize("shards", [1, 2])
def test_pytorch_bin_single_and_sharded(tmp_path, shards):
    model = write_model_dir(tmp_path / "m", small_config(intermediate_size=100), llama_shapes(**SMALL),
                            fmt="bin", shards=shards)
    report = check_config(model)
    assert report.weights_format == "bin"
    assert verdicts(report)["intermediate_size"] == (100, 128, "mismatch")


def test_wrong_num_key_value_heads(tmp_path):
    model = write_model_dir(tmp_path / "m", small_config(num_key_value_heads=4), llama_shapes(**SMALL))
    assert verdicts(check_config(model))["num_key_value_heads"] == (4, 2, "mismatch")


def test_tie_flag(tmp_path):
    tied_weights = llama_shapes(**SMALL, tied=True)
    model = write_model_dir(tmp_path / "a", small_config(), tied_weights)
    assert verdicts(check_config(model))["tie_word_embeddings"] == (False, True, "mismatch")
    absent = write_model_dir(tmp_path / "b", small_config(tie_word_embeddings=None), tied_weights)
    assert verdicts(check_config(absent))["tie_word_embeddings"] == (None, True, "missing")
    untied = write_model_dir(tmp_path / "c", small_config(tie_word_embeddings=None), llama_shapes(**SMALL))
    assert verdicts(check_config(untied))["tie_word_embeddings"][2] == "ok"  # llama defaults to untied


def test_longrope_factor_length_is_reported_not_invented(tmp_path):
    rope = {"rope_type": "longrope", "long_factor": [1.0] * 5, "short_factor": [1.0] * 8,
            "original_max_position_embeddings": 64}
    model = write_model_dir(tmp_path / "m", small_config(rope_scaling=rope), llama_shapes(**SMALL))
    report = check_config(model)
    v = verdicts(report)
    assert v["rope_scaling.long_factor length"] == (5, 8, "unfixable")
    assert v["rope_scaling.short_factor length"] == (8, 8, "ok")
    assert [c.field for c in report.unfixable] == ["rope_scaling.long_factor length"]
    assert report.fixed_config["rope_scaling"] == rope


def test_rope_parameters_v5_form(tmp_path):
    rope = {"rope_type": "longrope", "rope_theta": 10000.0, "long_factor": [1.0] * 8, "short_factor": [1.0] * 6}
    model = write_model_dir(tmp_path / "m", small_config(rope_parameters=rope, hidden_size=70), llama_shapes(**SMALL))
    report = check_config(model)
    assert verdicts(report)["rope_parameters.short_factor length"] == (6, 8, "unfixable")
    write_fixed_config(report)
    fixed = json.loads((model / "config.json").read_text())
    assert fixed["rope_parameters"] == rope and "rope_scaling" not in fixed
    assert fixed["hidden_size"] == 64


def test_head_dim_from_longrope_when_config_has_none(tmp_path):
    # q 64 outputs, k 32: head_dim could be 16 or 32; 8 factor entries say 16.
    rope = {"rope_type": "longrope", "long_factor": [1.0] * 8, "short_factor": [1.0] * 8}
    config = small_config(head_dim=None, num_attention_heads=None, num_key_value_heads=None, rope_scaling=rope)
    report = check_config(write_model_dir(tmp_path / "m", config, llama_shapes(**SMALL)))
    assert "long_factor" in report.head_dim_evidence
    v = verdicts(report)
    assert v["num_attention_heads"] == (None, 4, "missing") and v["num_key_value_heads"] == (None, 2, "missing")


def test_ambiguous_head_dim_asks_for_the_flag(tmp_path):
    # q 64 / 8 heads says head_dim 8, k 32 / 1 KV head says 32: the config's evidence disagrees.
    config = small_config(head_dim=None, num_attention_heads=8, num_key_value_heads=1)
    model = write_model_dir(tmp_path / "m", config, llama_shapes(**SMALL))
    with pytest.raises(ConfigError) as info:
        check_config(model)
    assert "cannot tell head_dim" in info.value.message and "16, 32" in info.value.message
    assert "--head-dim" in info.value.hint
    report = check_config(model, head_dim=16)
    assert verdicts(report)["num_attention_heads"] == (8, 4, "mismatch")
    assert verdicts(report)["head_dim"] == (None, 16, "ok")  # hidden 64 / 4 heads = 16 by default
    with pytest.raises(ConfigError, match="--head-dim 24 does not divide"):
        check_config(model, head_dim=24)


def test_wrong_config_head_dim_is_not_trusted(tmp_path):
    # head_dim 24 divides neither projection; the KV-head count decides (32 / 2 = 16).
    model = write_model_dir(tmp_path / "m", small_config(head_dim=24), llama_shapes(**SMALL))
    assert verdicts(check_config(model))["head_dim"] == (24, 16, "mismatch")


def test_unsupported_architecture(tmp_path):
    shapes = {"transformer.wte.weight": (96, 64), "transformer.h.0.attn.c_attn.weight": (64, 192)}
    model = write_model_dir(tmp_path / "gpt2", {"model_type": "gpt2"}, shapes)
    with pytest.raises(UnsupportedArchitecture, match="unsupported architecture"):
        check_config(model)
    assert require_consistent_config(model) is None


def test_require_consistent_config_for_other_commands(tmp_path):
    good = write_model_dir(tmp_path / "good", small_config(), llama_shapes(**SMALL))
    assert require_consistent_config(good).consistent
    bad = write_model_dir(tmp_path / "bad", small_config(hidden_size=80, num_hidden_layers=2), llama_shapes(**SMALL))
    with pytest.raises(ConfigError) as info:
        require_consistent_config(bad)
    assert "hidden_size: config.json says 80, the weights say 64" in info.value.message
    assert len(info.value.problems) == 2
    assert f"bitcpm fix-config {bad} --write" in info.value.hint


def test_inconsistent_layers_are_named(tmp_path):
    shapes = llama_shapes(**SMALL)
    shapes["model.layers.1.mlp.up_proj.weight"] = (100, 64)
    del shapes["model.layers.2.self_attn.v_proj.weight"]
    model = write_model_dir(tmp_path / "m", small_config(), shapes)
    with pytest.raises(InputError) as info:
        check_config(model)
    text = "\n".join(info.value.problems)
    assert "layer 1 mlp.up_proj.weight is [100, 64]" in text and "layer 2 has no self_attn.v_proj.weight" in text


# ---- bad input ---------------------------------------------------------------------------------
def test_folder_without_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(small_config()))
    with pytest.raises(InputError, match="no weights found"):
        check_config(tmp_path)


def test_missing_directory(tmp_path):
    with pytest.raises(InputError, match="not a model directory"):
        check_config(tmp_path / "nope")


def test_config_not_json(tmp_path):
    model = write_model_dir(tmp_path / "m", small_config(), llama_shapes(**SMALL))
    (model / "config.json").write_text('{"hidden_size": 64,\n  "vocab_size": }')
    with pytest.raises(ConfigError, match=r"config.json is not valid JSON .*line 2"):
        check_config(model)


def test_truncated_safetensors_header(tmp_path):
    model = write_model_dir(tmp_path / "m", small_config(), llama_shapes(**SMALL))
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(InputError, match="header is corrupt or truncated"):
        check_config(model)
    weights.write_bytes(b"\x01\x02")
    with pytest.raises(InputError, match="no header"):
        check_config(model)


def test_truncated_safetensors_data(tmp_path):
    model = write_model_dir(tmp_path / "m", small_config(), llama_shapes(**SMALL))
    weights = model / "model.safetensors"
    with weights.open("r+b") as handle:
        handle.truncate(weights.stat().st_size - 10)
    with pytest.raises(InputError, match="file is truncated"):
        check_config(model)


def test_corrupt_safetensors_header_json(tmp_path):
    model = write_model_dir(tmp_path / "m", small_config(), llama_shapes(**SMALL))
    weights = model / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[8:12] = b"\xff\xfe!!"
    weights.write_bytes(bytes(data))
    with pytest.raises(InputError, match="header is not valid JSON"):
        check_config(model)


def test_unreadable_bin(tmp_path):
    model = write_model_dir(tmp_path / "m", small_config(), llama_shapes(**SMALL), fmt="bin")
    (model / "pytorch_model.bin").write_bytes(b"this is not a torch checkpoint")
    with pytest.raises(InputError, match="cannot read"):
        check_config(model)


class _Exploit:
    def __reduce__(self):
        import os

        return (os.system, ("touch pwned",))


def test_malicious_pickle_is_not_executed(tmp_path, monkeypatch):
    import torch

    monkeypatch.chdir(tmp_path)
    model = write_model_dir(tmp_path / "m", small_config(), llama_shapes(**SMALL), fmt="bin")
    torch.save({"model.embed_tokens.weight": torch.zeros(2, 2), "payload": _Exploit()}, model / "pytorch_model.bin")
    with pytest.raises(InputError, match="refusing to load"):
        check_config(model)
    assert not (tmp_path / "pwned").exists()


def test_index_naming_missing_shards(tmp_path):
    model = write_model_dir(tmp_path / "m", small_config(), llama_shapes(**SMALL), shards=2)
    (model / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(InputError, match="missing shard.*model-00002-of-00002.safetensors"):
        check_config(model)


def test_output_equal_to_config_refused(tmp_path):
    model = write_model_dir(tmp_path / "m", small_config(hidden_size=80), llama_shapes(**SMALL))
    with pytest.raises(InputError, match="model's own config.json"):
        write_fixed_config(check_config(model), model / "config.json")



@pytest.mark.parametrize("factor", ["x", 0, 1.5, [0.5]])
def test_a_bad_partial_rotary_factor_is_reported_even_where_head_dim_comes_from_longrope(tmp_path, factor):
    # Before: a non-number crashed head_dim's derivation (exit 3) and 0 was taken for 1.0 without a word.
    rope = {"rope_type": "longrope", "long_factor": [1.0] * 8, "short_factor": [1.0] * 8}
    config = small_config(head_dim=None, rope_scaling=rope, partial_rotary_factor=factor)
    report = check_config(write_model_dir(tmp_path / "m", config, llama_shapes(**SMALL)))
    assert verdicts(report)["partial_rotary_factor"] == (factor, "a number within (0, 1]", "unfixable")
    assert "partial_rotary_factor" in [c.field for c in report.unfixable]
