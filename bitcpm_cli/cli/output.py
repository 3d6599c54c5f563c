"""Consoles and renderers shared by the commands."""

from __future__ import annotations

import json
import sys
from typing import Any

from rich.console import Console
from rich.markup import escape

out = Console(highlight=False)
err = Console(stderr=True, highlight=False)

LEVEL_STYLE = {"error": "bold red", "warning": "yellow", "info": "cyan", "ok": "green"}


def print_json(data: Any) -> None:
    """Machine-readable output on stdout, untouched by rich (no wrapping, no markup)."""
    sys.stdout.write(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    sys.stdout.flush()


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
