"""Core code that quiets transformers' (and the harness') logging puts it back as it found it."""

from __future__ import annotations

import importlib
import logging
from pathlib import Path

import pytest
from transformers.utils import logging as hf_logging

from bitcpm_cli.core.model.hf import quiet_transformers
from tests.helpers import build_tiny_model

ROOT = Path(__file__).resolve().parents[2]
hub_tqdm = importlib.import_module("huggingface_hub.utils.tqdm")


def logging_state() -> tuple[bool, int, dict[str, bool]]:
    return hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity(), dict(hub_tqdm.progress_bar_states)


@pytest.fixture(params=["defaults", "chatty"])
def state(request):
    """transformers' logging as a caller left it: the defaults, or bars off and verbosity INFO; put back after."""
    before = logging_state()
    if request.param == "chatty":
        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_info()
    else:
        hf_logging.enable_progress_bar()
        hf_logging.set_verbosity_warning()
    yield logging_state()
    hf_logging.set_verbosity(before[1])
    (hf_logging.enable_progress_bar if before[0] else hf_logging.disable_progress_bar)()
    hub_tqdm.progress_bar_states.clear()
    hub_tqdm.progress_bar_states.update(before[2])


@pytest.mark.parametrize("verbosity_error", [False, True])
def test_quiet_transformers_restores_after_normal_exit(state, verbosity_error):
    with quiet_transformers(verbosity_error=verbosity_error):
        assert not hf_logging.is_progress_bar_enabled()
        assert hub_tqdm.are_progress_bars_disabled()
        assert hf_logging.get_verbosity() == (logging.ERROR if verbosity_error else state[1])
    assert logging_state() == state


def test_quiet_transformers_restores_after_an_exception(state):
    with pytest.raises(RuntimeError, match="boom"):
        with quiet_transformers(verbosity_error=True):
            assert hf_logging.get_verbosity() == logging.ERROR
            raise RuntimeError("boom")
    assert logging_state() == state


def test_quiet_transformers_nests(state):
    with quiet_transformers():
        with quiet_transformers(verbosity_error=True):
            assert hf_logging.get_verbosity() == logging.ERROR
        assert not hf_logging.is_progress_bar_enabled() and hf_logging.get_verbosity() == state[1]
    assert logging_state() == state


def test_quiet_transformers_keeps_huggingface_hub_groups(state):
    hub_tqdm.disable_progress_bars("some.group")
    before = logging_state()
    with quiet_transformers():
        assert "some.group" not in hub_tqdm.progress_bar_states  # transformers' switch clears the groups
    assert logging_state() == before and hub_tqdm.are_progress_bars_disabled("some.group")


def test_load_for_inference_leaves_logging_as_it_found_it(state, tmp_path):
    from bitcpm_cli.core.engines.hf import load_for_inference

    build_tiny_model(tmp_path / "qat", kind="qat")
    loaded = load_for_inference(tmp_path / "qat", device="cpu", dtype="float32")
    assert loaded.info["format"] == "qat"
    assert logging_state() == state


def test_load_for_inference_restores_logging_when_loading_fails(state, tmp_path):
    from bitcpm_cli.core.engines.hf import load_for_inference
    from bitcpm_cli.core.errors import InputError

    build_tiny_model(tmp_path / "fused", kind="fused")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "fused" / name).unlink(missing_ok=True)
    with pytest.raises(InputError, match="no usable tokenizer"):
        load_for_inference(tmp_path / "fused", device="cpu")
    assert logging_state() == state


def test_train_leaves_logging_as_it_found_it(state, tmp_path):
    from bitcpm_cli.core.training.recipe import TrainConfig, resolve_config
    from bitcpm_cli.core.training.train import train

    build_tiny_model(tmp_path / "float", kind="float")
    (tmp_path / "count.txt").write_text("".join(" ".join(str(s + k) for k in range(12)) + "\n" for s in range(40)))
    config = resolve_config(TrainConfig, ROOT / "configs" / "pretrain" / "tiny-cpu.yaml", {
        "model": str(tmp_path / "float"), "data": [str(tmp_path / "count.txt")], "output_dir": str(tmp_path / "run")},
        ["max_steps=2", "save_steps=2"])
    seen = []
    result = train(config, on_event=lambda event: seen.append(hf_logging.get_verbosity()))
    assert result.steps == 2 and seen and set(seen) == {logging.ERROR}  # quiet while it ran
    assert logging_state() == state


def test_train_restores_logging_when_a_check_fails(state, tmp_path):
    from bitcpm_cli.core.errors import InputError
    from bitcpm_cli.core.training.recipe import TrainConfig, resolve_config
    from bitcpm_cli.core.training.train import train

    config = resolve_config(TrainConfig, ROOT / "configs" / "pretrain" / "tiny-cpu.yaml", {
        "model": str(tmp_path / "missing"), "data": [str(tmp_path / "count.txt")],
        "output_dir": str(tmp_path / "run")})
    with pytest.raises(InputError, match="model folder not found"):
        train(config)
    assert logging_state() == state and not (tmp_path / "run").exists()


def test_the_harness_quieting_is_put_back():
    pytest.importorskip("datasets")
    from datasets.utils import logging as datasets_logging

    from bitcpm_cli.core.evaluation.tasks import quiet_harness

    harness = logging.getLogger("lm_eval")
    before = harness.level, datasets_logging.is_progress_bar_enabled()
    harness.setLevel(logging.INFO)
    datasets_logging.enable_progress_bar()
    try:
        with pytest.raises(RuntimeError):
            with quiet_harness():
                assert harness.level == logging.ERROR and not datasets_logging.is_progress_bar_enabled()
                raise RuntimeError("boom")
        assert harness.level == logging.INFO and datasets_logging.is_progress_bar_enabled()
    finally:
        harness.setLevel(before[0])
        (datasets_logging.enable_progress_bar if before[1] else datasets_logging.disable_progress_bar)()
