"""load_learned_scales: a QAT checkpoint's `<module>.quant_alpha` tensors copied into the prepared model exactly
(safetensors or a weights_only .bin), or an InputError naming the tensor: missing (unless allowed), wrong shape,
not finite, or stored for a scheme without learned scales. And the header-only checks convert and fix-config use."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch

from bitcpm_cli.core.errors import InputError
from bitcpm_cli.core.model.learned_scales import (
    SCALE_PARAM_NAME,
    expected_scales,
    load_learned_scales,
    quiet_scale_report,
    scale_problems,
)
from bitcpm_cli.core.quant import SCALE_PARAM, QuantScheme, learned_scale_params, prepare
from tests.helpers import build_tiny_model


def test_the_suffix_spelled_without_torch_is_scale_param():
    assert SCALE_PARAM_NAME == SCALE_PARAM


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny model with learned scales (group 32) moved off absmean, saved; and the scales it holds."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("scales")
    build_tiny_model(root / "float", kind="float")
    model = AutoModelForCausalLM.from_pretrained(root / "float", dtype=torch.float32)
    prepare(model, QuantScheme(group_size=32, learned_scales=True))
    with torch.no_grad():
        for index, layer in enumerate(learned_scale_params(model).values()):
            layer.quant_alpha.mul_(1.0 + 0.03 * (index + 1))
    model.save_pretrained(root / "qat")
    return root, {name: layer.quant_alpha.detach().clone() for name, layer in learned_scale_params(model).items()}


def fresh(folder, group_size: int = 32, learned: bool = True):
    from transformers import AutoModelForCausalLM

    with quiet_scale_report():
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return prepare(model, QuantScheme(group_size=group_size, learned_scales=learned))


def rewrite(saved, tmp_path, change, fmt: str = "safetensors"):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "m"
    shutil.copytree(saved[0] / "qat", folder)
    state = load_file(folder / "model.safetensors")
    change(state)
    if fmt == "bin":
        (folder / "model.safetensors").unlink()
        torch.save(state, folder / "pytorch_model.bin")
    else:
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def test_scales_are_copied_in_exactly(saved):
    root, scales = saved
    model = fresh(root / "qat")
    assert not any(torch.equal(layer.quant_alpha, scales[name]) for name, layer in learned_scale_params(model).items())
    assert load_learned_scales(model, root / "qat") == 14
    assert all(torch.equal(layer.quant_alpha, scales[name]) for name, layer in learned_scale_params(model).items())


def test_a_weights_only_bin_checkpoint_is_read_too(saved, tmp_path):
    root, scales = saved
    folder = rewrite(saved, tmp_path, lambda state: None, fmt="bin")
    model = fresh(root / "qat")
    assert load_learned_scales(model, folder) == 14
    assert all(torch.equal(layer.quant_alpha, scales[name]) for name, layer in learned_scale_params(model).items())


NAME = "model.layers.1.self_attn.o_proj.quant_alpha"


def test_a_missing_scale_is_an_error_unless_allowed(saved, tmp_path):
    folder = rewrite(saved, tmp_path, lambda state: state.pop(NAME))
    model = fresh(folder)
    initial = learned_scale_params(model)[NAME].quant_alpha.detach().clone()
    with pytest.raises(InputError, match=f"^{NAME}: missing") as info:
        load_learned_scales(model, folder)
    assert "incomplete" in info.value.hint
    assert load_learned_scales(model, folder, allow_missing=True) == 13
    assert torch.equal(learned_scale_params(model)[NAME].quant_alpha, initial)  # the absmean start stays


def test_wrong_shapes_are_each_named(saved, tmp_path):
    other = "model.layers.0.mlp.down_proj.quant_alpha"

    def change(state):
        state[NAME] = state[NAME][:, :1].clone()
        state[other] = state[other].reshape(-1)

    folder = rewrite(saved, tmp_path, change)
    with pytest.raises(InputError, match="^2 learned scales do not fit") as info:
        load_learned_scales(fresh(folder), folder)
    assert info.value.problems == [
        f"{other}: shape [256] does not fit its weight [64, 128] at group_size 32 (that needs [64, 4])",
        f"{NAME}: shape [64, 1] does not fit its weight [64, 64] at group_size 32 (that needs [64, 2]); it fits "
        "group_size -1"]


def test_scales_for_a_scheme_without_them_are_refused(saved):
    root, _ = saved
    with pytest.raises(InputError, match="the checkpoint holds 14 learned scale tensor"):
        load_learned_scales(fresh(root / "qat", learned=False), root / "qat")


def test_a_scale_that_is_not_finite_is_refused(saved, tmp_path):
    folder = rewrite(saved, tmp_path, lambda state: state[NAME].__setitem__((0, 0), float("nan")))
    model = fresh(folder)
    before = {name: layer.quant_alpha.detach().clone() for name, layer in learned_scale_params(model).items()}
    with pytest.raises(InputError, match=f"^{NAME}: the learned scale holds NaN"):
        load_learned_scales(model, folder)
    assert all(torch.equal(layer.quant_alpha, before[n]) for n, layer in learned_scale_params(model).items())


def test_header_check_without_a_model(saved):
    from bitcpm_cli.core.model.checkpoint import read_tensor_specs
    from bitcpm_cli.core.quant import plan_state_dict

    root, _ = saved
    _, specs = read_tensor_specs(root / "qat")
    shapes, dtypes = {n: s.shape for n, s in specs.items()}, {n: s.dtype for n, s in specs.items()}
    fits = plan_state_dict(shapes, dtypes, QuantScheme(group_size=32, learned_scales=True))
    assert scale_problems(specs, expected_scales(specs, fits)) == []
    per_row = plan_state_dict(shapes, dtypes, QuantScheme(group_size=-1, learned_scales=True))
    problems = scale_problems(specs, expected_scales(specs, per_row))
    assert len(problems) == 14 and all(p.endswith("it fits group_size 32") for p in problems)


def test_the_load_report_is_quiet_only_when_it_lists_nothing_but_learned_scales(caplog):
    logger = logging.getLogger("transformers.modeling_utils")
    table = ("LlamaForCausalLM LOAD REPORT from: x\nKey | Status |  | \n----+----\n"
             "{rows}\n\nNotes:\n- UNEXPECTED:\tcan be ignored")
    only_scales = table.format(rows="model.layers.{0, 1}.mlp.up_proj.quant_alpha | UNEXPECTED |  | ")
    with_other = table.format(rows="model.layers.{0, 1}.mlp.up_proj.quant_alpha | UNEXPECTED |  | \n"
                                   "model.layers.0.mlp.up_proj.weight | MISSING | ")
    with caplog.at_level(logging.WARNING, logger="transformers.modeling_utils"):
        with quiet_scale_report():
            logger.warning(only_scales)
            logger.warning(with_other)
        logger.warning(only_scales)
    assert [r.getMessage() for r in caplog.records] == [with_other, only_scales]


def test_fix_config_reports_a_scale_that_does_not_fit(saved, tmp_path):
    from bitcpm_cli.core.model.config_check import check_config, require_consistent_config

    folder = rewrite(saved, tmp_path, lambda state: state.update({NAME: state[NAME][:, :1].clone()}))
    report = check_config(folder)
    check = next(c for c in report.checks if c.field == "bitcpm_quant.learned_scales")
    assert check.verdict == "unfixable" and check.note.startswith(f"{NAME}: shape [64, 1]")
    assert not report.consistent
    require_consistent_config(folder)  # loaders name the tensor themselves, not as a config.json disagreement
    good = check_config(saved[0] / "qat")
    assert good.consistent and json.dumps(good.to_dict())
