"""Issue #23 item 8: `--json` prints only JSON on stdout, through the installed `bitcpm` script with every extra
installed and DS_ACCELERATOR unset (DeepSpeed then logs "Setting accelerator to CPU" on the real stdout, which an
in-process runner cannot see); a check that fails (exit 1) still prints its report. `quickstart --json` is covered
by tests/integration/test_quickstart.py::test_quickstart_end_to_end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import bitcpm_script, build_tiny_model

ROOT = Path(__file__).resolve().parents[2]


def json_run(*args, codes=(0,)) -> dict | list:
    run = bitcpm_script(*args, "--json", unset=("DS_ACCELERATOR", "BITCPM_DEBUG"))
    assert run.returncode in codes, run.stderr[-3000:]
    return json.loads(run.stdout)  # the whole of stdout is one JSON document


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    from tests.integration.test_train import counting_corpus

    root = tmp_path_factory.mktemp("json")
    build_tiny_model(root / "qat", kind="qat")
    build_tiny_model(root / "float", kind="float")
    counting_corpus(root / "count.txt", lines=60)
    with (root / "chat.jsonl").open("w") as handle:
        for n in range(8):
            handle.write(json.dumps({"messages": [{"role": "user", "content": f"{n}"},
                                                  {"role": "assistant", "content": "OK"}]}) + "\n")
    return root


def test_every_inference_side_command_prints_only_json(work, tmp_path):
    assert "diagnoses" in json_run("env", codes=(0, 1))
    assert json_run("fix-config", work / "qat")["consistent"] is True
    assert json_run("convert", "-i", work / "qat", "-o", tmp_path / "fused")["format"] == "fused"
    results = json_run("infer", "-m", work / "qat", "-p", "Hi", "-o", tmp_path / "a.json", "--device", "cpu",
                       "--max-new-tokens", "2")
    assert results["schema"] == "bitcpm.results/1"
    assert json_run("compare", tmp_path / "a.json", tmp_path / "a.json")["ok"] is True
    report = json_run("eval", "-m", work / "qat", "--data", work / "count.txt", "--context", "32", "--max-tokens",
                      "64", "--device", "cpu")
    assert report["models"][0]["scored_tokens"] > 0 if "scored_tokens" in report["models"][0] else report["models"]


def test_a_failed_check_still_prints_its_report_as_json(work, tmp_path):
    # the tiny model's 64-wide rows cannot be exact TQ2_0 blocks: exit 1, the refusal as a bitcpm.check/1 document
    check = json_run("convert", "-i", work / "qat", "-o", tmp_path / "m.gguf", "--format", "gguf", codes=(1,))
    assert check["schema"] == "bitcpm.check/1" and check["exit_code"] == 1
    assert check["error"].startswith("cannot export exact TQ2_0 blocks") and check["problems"]
    assert not (tmp_path / "m.gguf").exists()


@pytest.mark.parametrize("command", ["train", "sft"])
def test_training_prints_only_json(work, tmp_path, command):
    recipe = ROOT / "configs" / ("pretrain" if command == "train" else "sft") / "tiny-cpu.yaml"
    data = work / ("count.txt" if command == "train" else "chat.jsonl")
    settings = json_run(command, "--list-settings")
    assert isinstance(settings, (list, dict)) and settings
    result = json_run(command, "--config", recipe, "--model", work / "float", "--data", data, "--output-dir",
                      tmp_path / "run", "max_steps=2", "save_steps=2", "logging_steps=1")
    assert Path(result["final_dir"]).is_dir()
