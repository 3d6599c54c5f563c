"""Every help page: plain flags (no type label), readable metavars; shell completion installs."""

import re

import pytest
import typer

from bitcpm_cli.cli.app import app
from bitcpm_cli.cli.output import readable_metavar

COMMANDS = sorted(typer.main.get_command(app).commands)


def test_an_older_typer_keeps_its_labels_and_every_command_still_imports(monkeypatch):
    import typer.core

    from bitcpm_cli.cli.output import install_readable_metavars

    monkeypatch.delattr(typer.core, "_TyperParameter", raising=False)  # typer < 0.29, found on a GPU machine
    install_readable_metavars()  # a no-op there, not an ImportError that stops every command


def test_readable_metavar():
    assert readable_metavar("<bool>") == "" and readable_metavar("<int>") == "INT"
    assert readable_metavar("<list[Path]>") == "PATH..." and readable_metavar("<list[str]>") == "TEXT..."
    assert readable_metavar("KEY=FIELD") == "KEY=FIELD"


@pytest.mark.parametrize("command", [None] + COMMANDS)
def test_help_page_has_no_python_type_labels(invoke, command):
    result = invoke(*([command] if command else []), "--help", env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert not re.search(r"<(bool|int|float|str|path|list\[[^]]*\])>", result.output), result.output
    assert "--help" in result.output


def test_every_reporting_command_has_json(invoke):
    for command in ("env", "fix-config", "convert", "infer", "compare", "eval", "train", "sft", "quickstart"):
        assert "--json" in invoke(command, "--help", env={"COLUMNS": "200"}).output, command


def test_shell_completion_installs(invoke, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    shown = invoke("--show-completion", "bash")
    assert shown.exit_code == 0 and "_bitcpm_completion" in shown.output
    installed = invoke("--install-completion", "bash")
    assert installed.exit_code == 0, installed.output
    assert "bitcpm" in (tmp_path / ".bashrc").read_text()
