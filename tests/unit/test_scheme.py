import json

import pytest

from bitcpm_cli.core.errors import ConfigError
from bitcpm_cli.core.quant import LayerQuant, QuantScheme, load_scheme_file


def test_defaults_match_design():
    scheme = QuantScheme()
    assert scheme.to_dict() == {"quant_type": "ternary", "group_size": 128,
                                "modules_to_not_convert": ["lm_head", "embed_tokens"], "layers": {}}


def test_every_problem_is_reported_at_once_with_the_fix():
    with pytest.raises(ConfigError) as info:
        QuantScheme(quant_type="ternery", group_size=-2, layers={"[bad": {"group_sise": 64}})
    problems = info.value.problems
    assert any("'ternery'" in p and "did you mean 'ternary'" in p for p in problems)
    assert any("group_size -2" in p and "-1 (one group per output row)" in p for p in problems)
    assert any("not a valid regular expression" in p for p in problems)
    assert any("'group_sise'" in p and "did you mean 'group_size'" in p for p in problems)
    assert len(problems) == 4


@pytest.mark.parametrize("group_size", [-1, 0, 64, 128])
def test_valid_group_sizes(group_size):
    assert QuantScheme(group_size=group_size).group_size == group_size


def test_bool_is_not_a_group_size():
    with pytest.raises(ConfigError, match="group_size True"):
        QuantScheme(group_size=True)


def test_config_round_trip_and_unknown_keys():
    block = {"quant_type": "int4", "group_size": -1, "modules_to_not_convert": ["lm_head"],
             "layers": {"mlp\\.down_proj": {"group_size": 64}}, "packed": True}
    scheme = QuantScheme.from_dict(block)
    assert scheme.to_dict() == block
    assert QuantScheme.from_config({"bitcpm_quant": block}) == scheme
    assert QuantScheme.from_config({"hidden_size": 8}) is None
    with pytest.raises(ConfigError, match="did you mean 'group_size'"):
        QuantScheme.from_dict({"groupsize": 64})
    with pytest.raises(ConfigError, match="must be a list"):
        QuantScheme.from_dict({"modules_to_not_convert": "lm_head"})


def test_resolution_skip_list_then_first_matching_override():
    scheme = QuantScheme(group_size=128, layers={
        r"mlp\.down_proj": {"group_size": -1},
        r"model\.layers\.0\..*": {"quant_type": "int8"},
        r"k_proj": {"quant_type": "none"},
    })
    assert scheme.for_module("lm_head") == LayerQuant("none", 128)
    assert not scheme.for_module("model.embed_tokens").enabled
    assert scheme.for_module("model.layers.1.mlp.down_proj") == LayerQuant("ternary", -1)
    assert scheme.for_module("model.layers.0.mlp.down_proj") == LayerQuant("ternary", -1)
    assert scheme.for_module("model.layers.0.self_attn.q_proj") == LayerQuant("int8", 128)
    assert scheme.for_module("model.layers.1.self_attn.k_proj") == LayerQuant("none", 128)
    assert scheme.for_module("model.layers.1.self_attn.q_proj") == LayerQuant("ternary", 128)
    # Exact names do not leak onto longer layer numbers.
    exact = QuantScheme(layers={r"model\.layers\.1\.mlp\.up_proj": {"group_size": 64}})
    assert exact.for_module("model.layers.11.mlp.up_proj").group_size == 128


def _strategy(entries):
    return {"layer_strategy": entries}


def _entry(bit, group_size=128, strategy="Quant_act_weight_eco", input_bit=16):
    return {"type": "<class 'torch.nn.modules.linear.Linear'>", "quant_strategy": strategy,
            "weight": {"bit": bit, "group_size": group_size}, "input": {"bit": input_bit}}


def test_cann_strategy_json(tmp_path):
    entries = {f"model.layers.{i}.self_attn.q_proj": _entry(1.58) for i in range(3)}
    entries["model.layers.2.mlp.down_proj"] = _entry(4, 64)
    entries["model.layers.1.mlp.up_proj"] = _entry(16)
    entries["lm_head"] = _entry(16, strategy="Quant_lm_head")
    path = tmp_path / "dopt_config.json"
    path.write_text(json.dumps(_strategy(entries)))
    scheme = load_scheme_file(path)
    assert (scheme.quant_type, scheme.group_size) == ("ternary", 128)
    assert scheme.modules_to_not_convert == ("lm_head", "embed_tokens")
    assert scheme.for_module("model.layers.2.mlp.down_proj") == LayerQuant("int4", 64)
    assert not scheme.for_module("model.layers.1.mlp.up_proj").enabled
    assert scheme.for_module("model.layers.0.self_attn.q_proj") == LayerQuant("ternary", 128)
    assert not scheme.for_module("lm_head").enabled


def test_cann_strategy_yaml_quantizes_lm_head_when_asked(tmp_path):
    import yaml

    entries = {"model.layers.0.mlp.gate_proj": _entry("1.58", -1), "lm_head": _entry(8, -1, "Quant_lm_head")}
    path = tmp_path / "strategy.yaml"
    path.write_text(yaml.safe_dump(_strategy(entries)))
    scheme = load_scheme_file(path)
    assert scheme.modules_to_not_convert == ("embed_tokens",)
    assert scheme.for_module("lm_head") == LayerQuant("int8", -1)
    assert scheme.for_module("model.layers.0.mlp.gate_proj") == LayerQuant("ternary", -1)


def test_cann_strategy_errors_are_all_reported(tmp_path):
    entries = {
        "model.layers.0.mlp.gate_proj": _entry(3),
        "model.layers.0.mlp.up_proj": _entry(1.58, input_bit=8),
        "model.embed_tokens": _entry(8, strategy="Quant_Embed_MinMax"),
        "model.layers.0.mlp.down_proj": {"bit": 4},
    }
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(_strategy(entries)))
    with pytest.raises(ConfigError) as info:
        load_scheme_file(path)
    text = "\n".join(info.value.problems)
    assert "weight.bit 3 is not supported" in text
    assert "input.bit 8" in text and "activation quantization" in text
    assert "embedding quantization is not supported" in text
    assert "needs a 'weight' mapping" in text


def test_cann_strategy_unreadable_or_malformed(tmp_path):
    with pytest.raises(Exception, match="cannot read quantization scheme file"):
        load_scheme_file(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_scheme_file(bad)
    empty = tmp_path / "empty.json"
    empty.write_text('{"layer_strategy": {}}')
    with pytest.raises(ConfigError, match="layer_strategy' must be a non-empty mapping"):
        load_scheme_file(empty)


def test_scheme_file_bare_or_under_key(tmp_path):
    bare = tmp_path / "scheme.yaml"
    bare.write_text("quant_type: ternary\ngroup_size: -1\n")
    assert load_scheme_file(bare) == QuantScheme(group_size=-1)
    wrapped = tmp_path / "config.json"
    wrapped.write_text(json.dumps({"hidden_size": 8, "bitcpm_quant": {"quant_type": "int4", "group_size": 32}}))
    assert load_scheme_file(wrapped) == QuantScheme(quant_type="int4", group_size=32)
    typo = tmp_path / "typo.yaml"
    typo.write_text("quant_type: ternary\ngroup: 64\n")
    with pytest.raises(ConfigError, match="unknown key"):
        load_scheme_file(typo)
