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

