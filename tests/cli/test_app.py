import subprocess
import sys

from bitcpm_cli import __version__
from bitcpm_cli.cli.app import exit_code_for
from bitcpm_cli.core.errors import BitcpmError, CheckFailed, ConfigError, DeviceError


def test_help_lists_commands_and_does_not_import_torch():
    code = ("import sys; from typer.testing import CliRunner; from bitcpm_cli.cli.app import app; "
            "r = CliRunner().invoke(app, ['--help']); assert r.exit_code == 0, r.output; print(r.output); "
            "assert 'torch' not in sys.modules, 'torch imported at start-up'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "env" in done.stdout and "fix-config" in done.stdout


def test_version(invoke):
    result = invoke("--version")
    assert result.exit_code == 0
    assert result.output.strip() == f"bitcpm {__version__}"


def test_python_dash_m_works():
    done = subprocess.run([sys.executable, "-m", "bitcpm_cli", "--version"], capture_output=True, text=True)
    assert done.returncode == 0 and __version__ in done.stdout


def test_exit_code_map():
    assert exit_code_for(CheckFailed("x")) == 1
    assert exit_code_for(ConfigError("x")) == 2
    assert exit_code_for(DeviceError("x")) == 2
    assert exit_code_for(BitcpmError("x")) == 2


def test_user_error_is_two_lines_without_traceback(invoke):
    result = invoke("env", "--device", "cuda:zero")
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [
        "error: invalid device 'cuda:zero': 'zero' is not a device index",
        "hint: use auto, cpu, cuda, cuda:N, npu, npu:N or mps",
    ]
    assert "Traceback" not in result.output


def test_debug_shows_the_traceback(invoke, monkeypatch):
    result = invoke("--debug", "env", "--device", "tpu")
    assert result.exit_code == 2
    assert "Traceback" in result.stderr and "error: unknown device 'tpu'" in result.stderr


def test_unknown_command_is_a_usage_error(invoke):
    assert invoke("frobnicate").exit_code == 2
