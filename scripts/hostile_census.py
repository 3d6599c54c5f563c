"""How many hostile cases the suite tries, by command: runs the safety, hostile and fuzz tests and counts every bitcpm
command they run (in-process through typer's CliRunner, or the installed script in a subprocess).

    python scripts/hostile_census.py            # the default hostile test files
    python scripts/hostile_census.py tests/fuzz # or any pytest arguments

Also a pytest plugin (`-p hostile_census` with scripts/ on the path): it is what the script loads.
"""

from __future__ import annotations

import collections
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HOSTILE = ["tests/fuzz", "tests/cli/test_safety.py", "tests/cli/test_outputs_special_and_disks.py",
           "tests/cli/test_eval_tasks_safety.py", "tests/cli/test_chat_templates_and_loading.py",
           "tests/cli/test_json_stdout.py", "tests/cli/test_eval_scoring.py", "tests/integration/test_gguf_hostile.py",
           "tests/integration/test_training_hostile.py"]
COMMANDS = {"env", "fix-config", "convert", "infer", "compare", "eval", "train", "sft", "quickstart"}
COUNTS: collections.Counter = collections.Counter()


def command_of(args) -> str | None:
    """The bitcpm subcommand in an argument list (global options such as --debug may come first)."""
    for arg in map(str, args):
        if arg in COMMANDS:
            return arg
        if not arg.startswith("-"):
            return None
    return None


def pytest_configure(config) -> None:
    import subprocess

    from typer.testing import CliRunner

    invoke, run = CliRunner.invoke, subprocess.run

    def counted_invoke(self, app, args=None, *rest, **kwargs):
        COUNTS[command_of(args or []) or "(usage)"] += 1
        return invoke(self, app, args, *rest, **kwargs)

    def counted_run(args, *rest, **kwargs):
        if isinstance(args, (list, tuple)):
            script = next((i for i, a in enumerate(args) if str(a).endswith(os.sep + "bitcpm")), None)
            if script is not None:
                COUNTS[command_of(args[script + 1:]) or "(usage)"] += 1
        return run(args, *rest, **kwargs)

    CliRunner.invoke, subprocess.run = counted_invoke, counted_run


def pytest_terminal_summary(terminalreporter) -> None:
    terminalreporter.write_sep("=", "hostile cases by command (bitcpm runs)")
    for command, count in sorted(COUNTS.items(), key=lambda item: -item[1]):
        terminalreporter.write_line(f"{command:12s} {count:6d}")
    terminalreporter.write_line(f"{'total':12s} {sum(COUNTS.values()):6d}")


def main() -> int:
    import pytest

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    targets = sys.argv[1:] or [t for t in HOSTILE if (ROOT / t).exists()]
    os.chdir(ROOT)
    return pytest.main(["-q", "-p", "no:cacheprovider", "-p", "hostile_census", *targets])


if __name__ == "__main__":
    sys.exit(main())
