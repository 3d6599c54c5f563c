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
        "model.layers.0.mlp.up_proj": _entry(1.58, input_bit=4),
        "model.embed_tokens": _entry(8, strategy="Quant_Embed_MinMax"),
        "model.layers.0.mlp.down_proj": {"bit": 4},
    }
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(_strategy(entries)))
    with pytest.raises(ConfigError) as info:
        load_scheme_file(path)
    text = "\n".join(info.value.problems)
    assert "weight.bit 3 is not supported" in text
    assert "input.bit 4 is not supported" in text
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


# ---- activations (issue #25) -----------------------------------------------------------------------------------------
def test_activations_round_trip_through_config():
    block = {"quant_type": "ternary", "group_size": 128, "modules_to_not_convert": ["lm_head"],
             "layers": {r"mlp\.down_proj": {"activations": "none"},
                        r"q_proj": {"quant_type": "int4", "group_size": 32, "activations": "q8_0"}},
             "activations": "q8_k"}
    scheme = QuantScheme.from_dict(block)
    assert scheme.activations == "q8_k"
    assert scheme.to_dict() == block
    assert QuantScheme.from_config({"bitcpm_quant": scheme.to_dict()}) == scheme
    assert "activations" not in QuantScheme(activations="none").to_dict()  # written only when not none
    assert QuantScheme.from_dict(QuantScheme().to_dict()).activations == "none"
    assert QuantScheme(activations="q8_k") != QuantScheme()


def test_for_module_resolves_activations():
    scheme = QuantScheme(group_size=128, activations="int8-token", layers={
        r"mlp\.down_proj": {"activations": "q8_k"},
        r"k_proj": {"quant_type": "none"},
        r"v_proj": {"activations": "none"},
        r"o_proj": {"quant_type": "int4", "group_size": 32},
    })
    assert scheme.for_module("model.layers.0.mlp.down_proj") == LayerQuant("ternary", 128, activations="q8_k")
    assert scheme.for_module("model.layers.0.self_attn.q_proj") == LayerQuant("ternary", 128,
                                                                               activations="int8-token")
    assert scheme.for_module("model.layers.0.self_attn.o_proj") == LayerQuant("int4", 32, activations="int8-token")
    assert scheme.for_module("model.layers.0.self_attn.v_proj").activations == "none"
    # A full-precision layer (quant_type none override) and a skipped module keep full-precision inputs.
    assert scheme.for_module("model.layers.0.self_attn.k_proj") == LayerQuant("none", 128)
    assert scheme.for_module("lm_head") == LayerQuant("none", 128)
    assert scheme.for_module("model.embed_tokens").activations == "none"
    # A float default with one quantized layer that asks for activations.
    mixed = QuantScheme(quant_type="none", layers={r"down_proj": {"quant_type": "ternary", "activations": "q8_0"}})
    assert mixed.for_module("model.layers.1.mlp.down_proj") == LayerQuant("ternary", 128, activations="q8_0")
    assert mixed.for_module("model.layers.1.mlp.up_proj") == LayerQuant("none", 128)


def test_activation_problems_are_reported_at_once():
    with pytest.raises(ConfigError) as info:
        QuantScheme(activations="Q8_K", layers={r"k_proj": {"quant_type": "none", "activations": "int8-token"},
                                                r"v_proj": {"activations": 8}})
    problems = info.value.problems
    assert any(p.startswith("activations 'Q8_K' is not one of none, int8-token, q8_k, q8_0")
               and "did you mean 'q8_k'" in p for p in problems)
    assert any(p.startswith("layers['k_proj']: activations int8-token") and "quant_type none" in p for p in problems)
    assert any(p.startswith("layers['v_proj']: activations 8 is not one of") for p in problems)
    assert len(problems) == 3
    with pytest.raises(ConfigError, match="activations q8_k .* quant_type none"):
        QuantScheme.from_dict({"quant_type": "none", "activations": "q8_k"})


def test_with_activations_overrides_every_layer():
    scheme = QuantScheme(activations="q8_k", layers={r"down_proj": {"activations": "none"},
                                                     r"q_proj": {"group_size": 32, "activations": "int8-token"},
                                                     r"k_proj": {"quant_type": "none"}})
    plain = scheme.with_activations("none")
    assert plain.activations == "none"
    assert plain.layers == {r"q_proj": {"group_size": 32}, r"k_proj": {"quant_type": "none"}}
    assert plain.for_module("model.layers.0.self_attn.q_proj") == LayerQuant("ternary", 32)
    assert scheme.activations == "q8_k" and scheme.layers[r"down_proj"] == {"activations": "none"}  # unchanged
    everywhere = scheme.with_activations("q8_0")
    for name in ("mlp.down_proj", "self_attn.q_proj", "mlp.up_proj"):
        assert everywhere.for_module(f"model.layers.0.{name}").activations == "q8_0"
    assert everywhere.for_module("model.layers.0.self_attn.k_proj").activations == "none"  # quant_type none
    with pytest.raises(ConfigError, match="'q8k'"):
        scheme.with_activations("q8k")


def test_activation_summary():
    assert QuantScheme().activation_summary() == "none"
    assert QuantScheme(activations="q8_k").activation_summary() == "q8_k"
    assert QuantScheme(activations="q8_k", layers={r"k_proj": {"quant_type": "none"}}).activation_summary() == "q8_k"
    some = QuantScheme(activations="q8_k", layers={r"down_proj": {"activations": "none"}})
    assert some.activation_summary() == "q8_k (none in some layers)"
    several = QuantScheme(layers={r"down_proj": {"activations": "q8_0"}, r"up_proj": {"activations": "int8-token"}})
    assert several.activation_summary() == "none (int8-token, q8_0 in some layers)"


def test_cann_input_bit_8_is_int8_token_with_a_note(tmp_path):
    entries = {f"model.layers.{i}.self_attn.q_proj": _entry(1.58, input_bit=8) for i in range(3)}
    entries["model.layers.0.mlp.down_proj"] = _entry(1.58, input_bit=16)
    entries["model.layers.1.mlp.down_proj"] = _entry(1.58, input_bit=32)
    entries["lm_head"] = _entry(16, strategy="Quant_lm_head")
    path = tmp_path / "dopt_config.json"
    path.write_text(json.dumps(_strategy(entries)))
    scheme = load_scheme_file(path)
    assert scheme.activations == "int8-token"
    assert scheme.for_module("model.layers.2.self_attn.q_proj") == LayerQuant("ternary", 128,
                                                                               activations="int8-token")
    assert scheme.for_module("model.layers.0.mlp.down_proj").activations == "none"
    assert scheme.for_module("model.layers.1.mlp.down_proj").activations == "none"
    assert scheme.for_module("lm_head").activations == "none"
    (note,) = scheme.notes
    assert str(path) in note and "input.bit 8 in 3 listed layer(s)" in note and "int8-token" in note
    assert "calibrated static activation scales" in note and "not reproduced" in note
    assert "notes" not in scheme.to_dict() and scheme == QuantScheme.from_dict(scheme.to_dict())
    assert scheme.replace(group_size=64).notes == scheme.notes


def test_cann_input_bit_16_or_32_stays_full_precision_without_a_note(tmp_path):
    entries = {"model.layers.0.mlp.up_proj": _entry(1.58, input_bit=16),
               "model.layers.0.mlp.gate_proj": _entry(1.58, input_bit=32),
               "model.layers.0.mlp.down_proj": {"weight": {"bit": 1.58, "group_size": 128}}}
    path = tmp_path / "dopt_config.json"
    path.write_text(json.dumps(_strategy(entries)))
    scheme = load_scheme_file(path)
    assert scheme.activations == "none" and scheme.notes == ()
    assert all(scheme.for_module(name).activations == "none" for name in entries)


def test_cann_unsupported_input_bits_are_listed_with_other_problems(tmp_path):
    entries = {"model.layers.0.mlp.up_proj": _entry(1.58, input_bit=4),
               "model.layers.0.mlp.gate_proj": _entry(1.58, input_bit=True),
               "model.layers.0.mlp.down_proj": _entry(3),
               "model.layers.1.mlp.up_proj": _entry(16, input_bit=8)}
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(_strategy(entries)))
    with pytest.raises(ConfigError) as info:
        load_scheme_file(path)
    problems = info.value.problems
    assert any("'model.layers.0.mlp.up_proj'" in p and "input.bit 4 is not supported" in p for p in problems)
    assert any("'model.layers.0.mlp.gate_proj'" in p and "input.bit True is not supported" in p for p in problems)
    assert any("weight.bit 3 is not supported" in p for p in problems)
    assert any("'model.layers.1.mlp.up_proj'" in p and "quant_type none" in p for p in problems)
    assert len(problems) == 4


@pytest.mark.parametrize("layers", [{"q_proj": 3}, {"q_proj": [["quant_type", "int4"]]}, {3: {"group_size": 32}}])
def test_layer_overrides_that_are_no_mapping_or_pattern_are_config_errors(layers):
    """Not coerced by dict() (a list of pairs became an override) and no TypeError: a ConfigError naming the entry."""
    with pytest.raises(ConfigError) as info:
        QuantScheme.from_dict({"layers": layers})
    assert not info.value.problems  # one problem: it is the message
    assert info.value.message.startswith(f"layers[{next(iter(layers))!r}]: ")
