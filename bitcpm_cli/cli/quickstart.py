"""`bitcpm quickstart`: the whole pipeline on a tiny model, on the CPU, in a few minutes."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from bitcpm_cli.cli.output import LEVEL_STYLE, err, out


def quickstart(
    output_dir: Path = typer.Option(Path("bitcpm-quickstart"), "--output-dir", "-o", help="Where everything goes."),
) -> None:
    """Build a tiny BitCPM-shaped model, train it (ternary QAT), fine-tune it, convert it (fused, packed), run it
    as QAT checkpoint and as fused model, compare the two, and write SUMMARY.md with the losses and generations."""
    from bitcpm_cli.core.quickstart import run_quickstart

    with err.status("starting") as status:
        def on_stage(stage: str, detail: str) -> None:
            if detail == "start":
                status.update(f"{stage} ...")
            else:
                out.print(f"[{LEVEL_STYLE['ok']}]done[/] {stage}: {escape(detail)}", soft_wrap=True)

        result = run_quickstart(output_dir, on_stage)
    table = Table(title="held-out prompts (greedy)")
    for column in ("model", "prompt", "expected", "generated", "correct"):
        table.add_column(column)
    for g in result.generations:
        table.add_row(g["model"], escape(g["prompt"]), escape(g["expected"]), escape(g["generated"]),
                      "[green]yes[/]" if g["correct"] else "[red]NO[/]")
    out.print(table)
    sizes = Table(title="weights", show_header=False)
    for name, size in result.sizes.items():
        sizes.add_row(name, f"{size / 2**20:.2f} MiB")
    out.print(sizes)
    for note in result.notes:
        out.print(f"note: {escape(note)}", soft_wrap=True)
    total = sum(seconds for _, seconds, _ in result.stages)
    out.print(f"[{LEVEL_STYLE['ok']}]quickstart passed[/] in {total:.0f} s: see {escape(str(Path(output_dir) / 'SUMMARY.md'))}")
