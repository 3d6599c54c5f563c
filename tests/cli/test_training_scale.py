"""train/sft: settings listing, the memory plan before loading, report_to, and the multi-process pre-flight checks."""

import json
import os
import time
from pathlib import Path

import pytest

from tests.helpers import build_tiny_model
from tests.integration.test_train import RECIPE, counting_corpus
from tests.unit.test_memory_plan import BITCPM4_1B


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("scale")
    build_tiny_model(root / "float", kind="float")
    counting_corpus(root / "count.txt", lines=60)
    return root


@pytest.mark.parametrize("command", ["train", "sft"])
def test_list_settings_shows_every_setting_with_its_default(invoke, command):
    result = invoke(command, "--list-settings")
    assert result.exit_code == 0, result.output
    for text in ("learning_rate", "report_to", "fsdp_config", "num_train_epochs", "max_memory_gb", "optim"):
        assert text in result.output, text
    lines = result.output.splitlines()
    assert f"lr = {1e-4 if command == 'train' else 2e-5!r}  (also: learning_rate)" in lines
    assert "optim = 'adamw_torch_fused'" in lines and "report_to = 'none'" in lines
    assert "use_cpu = False  [refused: use device=cpu]" in lines


def test_a_run_that_cannot_fit_stops_before_loading_with_the_plan(invoke, tmp_path):
    model = tmp_path / "bitcpm4-1b"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(BITCPM4_1B))  # no weights, no tokenizer: nothing is loaded
    data = counting_corpus(tmp_path / "count.txt", lines=5)
    result = invoke("train", "--model", model, "--data", data, "--output-dir", tmp_path / "out", "--device", "cpu",
                    "block_size=512", "max_memory_gb=24")
    assert result.exit_code == 2, result.output
    assert "this run needs" in result.stderr and "GiB per rank but 24.0 GiB is available" in result.stderr
    for part in ("weights: 6.04 GiB", "gradients: 6.04 GiB", "optimizer states (AdamW): 12.09 GiB",
                 "activations per micro-batch"):
        assert part in result.stderr, part
    assert "settings that would fit: deepspeed=configs/deepspeed/zero3.json over 2 machines" in result.stderr
    assert not (tmp_path / "out").exists() and "Traceback" not in result.output


def test_progress_and_the_plan_from_the_first_second_and_report_to_tensorboard(invoke, tiny, tmp_path):
    pytest.importorskip("tensorboard")
    result = invoke("train", "--config", RECIPE, "--model", tiny / "float", "--data", tiny / "count.txt",
                    "--output-dir", tmp_path / "run", "max_steps=2", "logging_steps=1", "report_to=tensorboard")
    assert result.exit_code == 0, result.output
    lines = result.stderr.splitlines()
    order = [next(i for i, line in enumerate(lines) if line.startswith(prefix)) for prefix in (
        "memory plan: weights:", "loading the tokenizer and the data ...", "loading the model ...",
        "preparing one process ...", "step 1 (the first one also builds the graph) ...", "step 1/2")]
    assert order == sorted(order), lines
    events = list((tmp_path / "run" / "runs").rglob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0


def test_multi_process_without_a_backend_is_exit_2(invoke, tiny, tmp_path, monkeypatch):
    import torch.distributed

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(torch.distributed, "is_gloo_available", lambda: False)
    result = invoke("train", "--config", RECIPE, "--model", tiny / "float", "--data", tiny / "count.txt",
                    "--output-dir", tmp_path / "run")
    assert result.exit_code == 2
    assert "2 processes on cpu need the gloo backend, which this torch build lacks" in result.stderr
    assert not (tmp_path / "run").exists()


def stale_lock(root: Path) -> Path:
    lock = root / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir(parents=True)
    lock.write_text("")
    old = time.time() - 3600
    os.utime(lock, (old, old))
    return lock


def test_a_stale_extension_lock_is_named_by_env_and_refused_by_train(invoke, tiny, tmp_path, monkeypatch):
    pytest.importorskip("deepspeed")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    lock = stale_lock(tmp_path / "ext")
    result = invoke("env", "--json")
    report = json.loads(result.stdout)
    assert result.exit_code == 1
    assert report["deepspeed"]["accelerator"] == "cpu" and report["deepspeed"]["extensions_dir"] == str(tmp_path / "ext")
    problem = next(d for d in report["diagnoses"] if "lock" in d["message"])
    assert problem["level"] == "error" and str(lock) in problem["message"] and f"rm {lock}" in problem["hint"]
    monkeypatch.setenv("WORLD_SIZE", "2")
    result = invoke("train", "--config", RECIPE, "--model", tiny / "float", "--data", tiny / "count.txt",
                    "--output-dir", tmp_path / "run", f"deepspeed={Path(RECIPE).parents[1] / 'deepspeed' / 'zero2.json'}")
    assert result.exit_code == 2 and f"stale extension build lock {lock}" in result.stderr
    assert not (tmp_path / "run").exists()
    lock.unlink()
    assert invoke("env").exit_code == 0


def test_deepspeed_that_cannot_be_imported_is_exit_2(invoke, tiny, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "deepspeed", None)  # import deepspeed raises ImportError
    monkeypatch.setenv("WORLD_SIZE", "2")
    result = invoke("train", "--config", RECIPE, "--model", tiny / "float", "--data", tiny / "count.txt",
                    "--output-dir", tmp_path / "run", f"deepspeed={Path(RECIPE).parents[1] / 'deepspeed' / 'zero2.json'}")
    assert result.exit_code == 2 and "deepspeed= is set but DeepSpeed cannot be imported" in result.stderr
    assert "bitcpm[deepspeed]" in result.stderr and not (tmp_path / "run").exists()


def test_report_to_tensorboard_without_tensorboard_is_exit_2_naming_the_package(invoke, tiny, tmp_path,
                                                                                 monkeypatch):
    import sys

    for name in ("tensorboard", "tensorboardX"):  # not installed (tensorboard is only in the dev extra)
        monkeypatch.setitem(sys.modules, name, None)
    result = invoke("train", "--config", RECIPE, "--model", tiny / "float", "--data", tiny / "count.txt",
                    "--output-dir", tmp_path / "run", "max_steps=2", "report_to=tensorboard")
    assert result.exit_code == 2, result.output
    assert "tensorboard" in result.stderr and "pip install tensorboard" in result.stderr
    assert not (tmp_path / "run").exists()


def test_an_optimizer_whose_package_is_missing_is_exit_2_before_the_folder_exists(invoke, tiny, tmp_path,
                                                                                  monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # not installed
    result = invoke("train", "--config", RECIPE, "--model", tiny / "float", "--data", tiny / "count.txt",
                    "--output-dir", tmp_path / "run", "max_steps=2", "optim=adamw_bnb_8bit")
    assert result.exit_code == 2, result.output
    assert "optim=adamw_bnb_8bit needs a package that is not installed" in result.stderr
    assert "bitsandbytes" in result.stderr and not (tmp_path / "run").exists()
