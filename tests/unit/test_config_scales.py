"""MiniCPM's scale fields in config.json (issue #23 item 5): a MiniCPM config whose scale_emb, scale_depth or
dim_model_base is not a positive finite number (`dim_model_base: 0` divides by zero) is refused, naming the field,
by the check every model-loading command runs (require_consistent_config: convert, infer, eval, train), and
fix-config reports it as a field no repair can derive; model types that ignore the fields are left alone."""

import json

import pytest

from bitcpm_cli.core.errors import ConfigError
from bitcpm_cli.core.model.config_check import (
    check_config,
    require_consistent_config,
    scale_field_problems,
)
from tests.helpers import llama_shapes, write_model_dir

SHAPES = {"hidden": 32, "layers": 1, "heads": 2, "kv_heads": 1, "head_dim": 16, "intermediate": 64, "vocab": 64}
CONFIG = {"model_type": "minicpm", "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
          "num_key_value_heads": 1, "head_dim": 16, "intermediate_size": 64, "vocab_size": 64,
          "tie_word_embeddings": False, "torch_dtype": "bfloat16", "scale_emb": 12, "scale_depth": 1.4,
          "dim_model_base": 256}


@pytest.mark.parametrize("value", [0, -1, -0.5, 0.0, "256", True, False, [256], {"v": 1}])
@pytest.mark.parametrize("field", ["scale_emb", "scale_depth", "dim_model_base"])
def test_a_scale_that_is_not_a_positive_number_is_a_problem_naming_it(field, value):
    assert scale_field_problems({**CONFIG, field: value}) == [
        f"{field}: config.json says {value!r}, model_type 'minicpm' needs a positive number"]


@pytest.mark.parametrize("changes", [{}, {"scale_emb": 1}, {"dim_model_base": 1e-3}, {"scale_depth": None},
                                     {"model_type": "llama", "dim_model_base": 0},
                                     {"model_type": "mistral", "scale_emb": "x"}])
def test_valid_unset_or_ignored_scales_are_no_problem(changes):
    assert scale_field_problems({**CONFIG, **changes}) == []


def test_other_minicpm_model_types_are_checked_too():
    assert scale_field_problems({**CONFIG, "model_type": "minicpm3", "scale_depth": -1.4}) != []


def test_every_bad_scale_is_named_at_once_by_the_loading_check(tmp_path):
    folder = write_model_dir(tmp_path / "m", {**CONFIG, "dim_model_base": 0, "scale_emb": -12},
                             llama_shapes(**SHAPES))
    before = (folder / "config.json").read_bytes()
    with pytest.raises(ConfigError) as info:
        require_consistent_config(folder)
    assert str(info.value) == (f"invalid MiniCPM scale in {folder / 'config.json'}: scale_emb: config.json says -12, "
                               "model_type 'minicpm' needs a positive number")
    assert info.value.problems == [
        "scale_emb: config.json says -12, model_type 'minicpm' needs a positive number",
        "dim_model_base: config.json says 0, model_type 'minicpm' needs a positive number"]
    assert "dim_model_base 256" in info.value.hint
    assert (folder / "config.json").read_bytes() == before


def test_the_loading_check_refuses_a_bad_scale_even_where_the_weights_are_not_understood(tmp_path):
    folder = write_model_dir(tmp_path / "m", {**CONFIG, "scale_depth": "1.4"}, {"w": (4, 4)})
    with pytest.raises(ConfigError, match="scale_depth: config.json says '1.4'"):
        require_consistent_config(folder)


def test_fix_config_reports_a_bad_scale_as_unfixable(tmp_path):
    folder = write_model_dir(tmp_path / "m", {**CONFIG, "dim_model_base": 0}, llama_shapes(**SHAPES))
    report = check_config(folder)
    assert [c.field for c in report.unfixable] == ["dim_model_base"]
    assert report.to_dict()["unfixable"] == ["dim_model_base"] and not report.consistent
    assert json.loads((folder / "config.json").read_text())["dim_model_base"] == 0


def test_a_sound_minicpm_config_passes(tmp_path):
    folder = write_model_dir(tmp_path / "m", CONFIG, llama_shapes(**SHAPES))
    assert require_consistent_config(folder).consistent
