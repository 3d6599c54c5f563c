"""`bitcpm fix-config`: find and repair config.json fields that disagree with the weight shapes."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table

from bitcpm_cli.cli.output import LEVEL_STYLE, out, print_json

VERDICT_STYLE = {"ok": LEVEL_STYLE["ok"], "mismatch": LEVEL_STYLE["error"], "missing": LEVEL_STYLE["warning"],
                 "unfixable": LEVEL_STYLE["error"]}


def _show(value, present: bool = True) -> str:
    return "[dim](not set)[/]" if not present else escape(str(value))


def fix_config(
    model: Path = typer.Argument(..., help="Model directory holding config.json and the weights."),
    write: bool = typer.Option(False, "--write", help="Rewrite config.json in place (keeps config.json.bak)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Write the fixed config to this file instead."),
    head_dim: Optional[int] = typer.Option(None, "--head-dim", help="Head dimension, when the weights leave it ambiguous."),
    json_output: bool = typer.Option(False, "--json", help="Print a machine-readable report on stdout."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --output file."),
) -> None:
    """Check config.json against the weight shapes (headers only); exit 1 when they disagree.

    Derives vocab_size, hidden_size, num_hidden_layers, intermediate_size, attention and KV heads, head_dim,
    tie_word_embeddings and the dtype from the tensors, and checks LongRoPE factor lengths.
    """
    from bitcpm_cli.core.errors import InputError
    from bitcpm_cli.core.model.config_check import check_config, require_fixed, write_fixed_config

    if write and output is not None:
        raise InputError("--write and --output both given", hint="--write repairs in place; --output writes elsewhere")
    report = check_config(model, head_dim=head_dim)
    if write or output is not None:
        write_fixed_config(report, output, overwrite)
    if json_output:
        print_json(report.to_dict())
    else:
        _render(report)
    require_fixed(report)


def _render(report) -> None:
    table = Table(title=f"config.json vs weights: {escape(report.model)}")
    for column in ("field", "config.json", "weights", "verdict"):
        table.add_column(column)
    for check in report.checks:
        style = VERDICT_STYLE[check.verdict]
        table.add_row(check.field, _show(check.config, check.present), _show(check.weights),
                      f"[{style}]{check.verdict}[/]")
    out.print(table)
    out.print(f"weights: {report.tensors} tensors, {report.parameters:,} parameters in "
              f"{len(report.weight_files)} {report.weights_format} file(s); head_dim from {report.head_dim_evidence}",
              soft_wrap=True)
    for check in report.checks:
        if check.note and check.verdict != "ok":
            out.print(f"  {check.field}: {escape(check.note)}", soft_wrap=True)
    if report.written:
        backup = f" (backup: {report.backup})" if report.backup else ""
        out.print(f"[{LEVEL_STYLE['ok']}]wrote[/] {escape(report.written)}{escape(backup)}: "
                  f"{len(report.to_fix)} field(s) fixed", soft_wrap=True)
    elif report.consistent:
        out.print(f"[{LEVEL_STYLE['ok']}]config.json agrees with the weights[/]")
    elif report.to_fix:
        out.print(f"{len(report.to_fix)} field(s) disagree; run again with --write to repair config.json "
                  "(a backup is kept)", soft_wrap=True)
    for check in report.unfixable:
        out.print(f"[{LEVEL_STYLE['error']}]cannot fix[/] {check.field}: {escape(check.note)}", soft_wrap=True)
