"""The commands whose paths the core/ refactor moved (convert, infer, compare, fix-config, env), run through the
installed `bitcpm` script in a subprocess: what libraries print on the real stdout is seen here, which the in-process
runner misses. `--json` stdout parses; bad input is exit 2 with one `error:` line, no traceback and nothing written;
a failed check is exit 1 with its report on stdout and its verdict on stderr."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import BITCPM_1B, bitcpm_1b_published_config, build_tiny_model, llama_shapes, write_model_dir

SCRIPT = Path(sys.executable).parent / "bitcpm"


def bitcpm(*args, cwd=None) -> subprocess.CompletedProcess:
    assert SCRIPT.is_file(), f"the bitcpm script is not installed beside {sys.executable} (pip install -e .)"
    # DS_ACCELERATOR as CI sets it (DeepSpeed's own stdout line when it is unset is issue #23's item 8)
    environment = {**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")}
    environment.pop("BITCPM_DEBUG", None)
    return subprocess.run([str(SCRIPT), *map(str, args)], capture_output=True, text=True, timeout=600,
                          stdin=subprocess.DEVNULL, cwd=cwd, env=environment)


def one_error(run: subprocess.CompletedProcess, start: str) -> None:
    lines = run.stderr.splitlines()
    assert run.returncode == 2, run.stderr
    assert lines[0].startswith(f"error: {start}") and lines[-1].startswith("hint: "), run.stderr
    assert sum(line.startswith("error:") for line in lines) == 1 and "Traceback" not in run.stderr


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("installed")
    build_tiny_model(root / "qat", kind="qat")
    return root


def test_convert_json_and_bad_format(models, tmp_path):
    run = bitcpm("convert", "-i", models / "qat", "-o", tmp_path / "fused", "--json")
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert report["format"] == "fused" and report["input_kind"] == "qat" and (tmp_path / "fused").is_dir()
    bad = bitcpm("convert", "-i", models / "qat", "-o", tmp_path / "x", "--format", "tq2")
    one_error(bad, "--format 'tq2' is not one of fused, packed, gguf")
    assert not (tmp_path / "x").exists() and sorted(os.listdir(tmp_path)) == ["fused"]


def test_infer_and_compare_json_verdict_and_bad_input(models, tmp_path):
    run = bitcpm("infer", "-m", models / "qat", "-p", "Hello", "-o", tmp_path / "a.json", "--device", "cpu",
                 "--max-new-tokens", "6", "--json")
    assert run.returncode == 0, run.stderr
    document = json.loads(run.stdout)
    assert document == json.loads((tmp_path / "a.json").read_text())  # stdout is the file's document
    assert document["runtime"]["engine"] == "hf" and document["results"][0]["num_tokens"] >= 1
    flipped = json.loads(json.dumps(document))
    flipped["results"][0]["token_ids"][0] = (flipped["results"][0]["token_ids"][0] + 1) % 90 + 4
    (tmp_path / "b.json").write_text(json.dumps(flipped))
    differ = bitcpm("compare", tmp_path / "a.json", tmp_path / "b.json", "--json")
    assert differ.returncode == 1
    assert json.loads(differ.stdout)["ok"] is False
    assert differ.stderr.startswith("error: 1 of 1 prompt(s) differ\nhint: ") and "Traceback" not in differ.stderr
    bad = bitcpm("compare", tmp_path / "a.json", tmp_path / "missing.json", "--output", tmp_path / "r.json")
    one_error(bad, "")
    assert "missing.json" in bad.stderr and not (tmp_path / "r.json").exists()
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": 3}\n')
    bad = bitcpm("infer", "-m", models / "qat", "--prompts", prompts, "-o", tmp_path / "c.json")
    one_error(bad, "")
    assert not (tmp_path / "c.json").exists()


def test_fix_config_json_verdict_debug_and_bad_input(tmp_path):
    model = write_model_dir(tmp_path / "m", bitcpm_1b_published_config(), llama_shapes(**BITCPM_1B))
    before, files = (model / "config.json").read_bytes(), sorted(os.listdir(model))
    run = bitcpm("fix-config", model, "--json")
    assert run.returncode == 1 and json.loads(run.stdout)["consistent"] is False
    assert run.stderr.startswith("error: config.json disagrees with the weights in 4 field(s): ")
    assert "Traceback" not in run.stderr
    debug = bitcpm("--debug", "fix-config", model)  # README: under --debug the traceback follows the verdict
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "require_fixed" in debug.stderr
    bad = bitcpm("fix-config", tmp_path / "nowhere")
    one_error(bad, "")
    assert (model / "config.json").read_bytes() == before and sorted(os.listdir(model)) == files  # nothing written


def test_env_json_parses():
    run = bitcpm("env", "--json")
    assert run.returncode in (0, 1), run.stderr
    report = json.loads(run.stdout)
    assert report["selected"] is not None or report["selection_error"]
    assert (run.returncode == 1) == any(d["level"] == "error" for d in report["diagnoses"])
    bad = bitcpm("env", "--device", "tpu")
    one_error(bad, "unknown device")
