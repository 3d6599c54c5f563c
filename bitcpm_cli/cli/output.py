"""Consoles and renderers shared by the commands."""

from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager
from typing import Any, Iterator

from rich.console import Console
from rich.markup import escape

out = Console(highlight=False)
err = Console(stderr=True, highlight=False)

LEVEL_STYLE = {"error": "bold red", "warning": "yellow", "info": "cyan", "ok": "green"}


class _JsonStdout:
    stream: Any = None  # where print_json writes while a --json command runs (the real stdout)
    printed = False


def print_json(data: Any) -> None:
    """Machine-readable output on stdout, untouched by rich (no wrapping, no markup)."""
    stream = _JsonStdout.stream or sys.stdout
    if stream is not None:  # None: stdout was closed (`>&-`), nothing can be printed
        stream.write(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
        stream.flush()
    _JsonStdout.printed = True


@contextmanager
def json_stdout(active: bool) -> Iterator[None]:
    """While a `--json` command runs, stdout holds only its JSON: everything else written there (Python prints,
    library loggers such as DeepSpeed's, C code, child processes) goes to stderr. At the file-descriptor level when
    stdout is a real file, else (an in-process runner's buffer) by swapping sys.stdout."""
    real = sys.stdout
    if not active or real is None:  # stdout closed: nothing to keep clean
        yield
        return
    real.flush()
    fd, saved, sink = _fileno(real), None, None
    if fd is not None:
        target = _fileno(sys.stderr)
        if target is None:  # stderr closed too: what is not the JSON goes nowhere
            sink = target = os.open(os.devnull, os.O_WRONLY)
        if sys.stderr is not None:
            sys.stderr.flush()
        saved = os.dup(fd)
        os.dup2(target, fd)
        _JsonStdout.stream = open(saved, "w", encoding="utf-8", closefd=False)  # noqa: SIM115 (closed below)
    else:
        _JsonStdout.stream, sys.stdout = real, sys.stderr
    _JsonStdout.printed = False
    try:
        yield
    finally:
        _restore_stdout(real, fd, saved, sink)


def _fileno(stream: Any) -> int | None:
    try:
        return stream.fileno()
    except (AttributeError, OSError, ValueError):
        return None


def _restore_stdout(real: Any, fd: int | None, saved: int | None, sink: int | None) -> None:
    if sys.stdout is not None:
        sys.stdout.flush()
    _JsonStdout.stream.flush()
    if saved is not None:
        os.dup2(saved, fd)
        os.close(saved)
    else:
        sys.stdout = real
    if sink is not None:
        os.close(sink)
    _JsonStdout.stream = None


def json_printed() -> bool:
    """Whether the running --json command has printed its document."""
    return _JsonStdout.printed


def print_error(message: str, hint: str | None = None, problems: list[str] | tuple[str, ...] = ()) -> None:
    err.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)
    for problem in problems:
        err.print(f"  - {escape(problem)}", soft_wrap=True)
    if hint:
        err.print(f"[bold]hint:[/] {escape(hint)}", soft_wrap=True)



# ---- help pages: readable metavars -------------------------------------------------------------------------------
# Typer shows every option's Python type (`<bool>`, `<list[Path]>`); bitcpm's help shows plain flags with no type and
# values as the usual upper-case metavars (PATH, INT, TEXT ...), a repeatable option with "...".
METAVARS = {"bool": "", "int": "INT", "float": "FLOAT", "str": "TEXT", "path": "PATH", "Path": "PATH",
            "file": "FILE", "directory": "DIR", "bytes": "TEXT"}


def readable_metavar(typer_label: str) -> str:
    """`<list[Path]>` -> `PATH...`, `<bool>` -> `` (a flag), `<int>` -> `INT`; other labels unchanged."""
    if not (typer_label.startswith("<") and typer_label.endswith(">")):
        return typer_label
    label = typer_label[1:-1]
    repeated = label.startswith("list[") and label.endswith("]")
    label = label[5:-1] if repeated else label
    name = METAVARS.get(label, label.upper())
    return f"{name}..." if repeated and name else name


def install_readable_metavars() -> None:
    """Route Typer's type labels through readable_metavar (explicit metavars are kept as written). This needs
    Typer 0.29 or later (what pyproject.toml asks for); an older Typer found at run time keeps its own labels in
    help pages (`<path>` in 0.27) rather than stopping every command with an ImportError."""
    import typer.core

    parameter = getattr(typer.core, "_TyperParameter", None)
    original = getattr(parameter, "display_type", None)
    if original is None or getattr(original, "_bitcpm", False):
        return

    def display_type(self, ctx):
        return readable_metavar(original(self, ctx))

    display_type._bitcpm = True
    parameter.display_type = display_type
