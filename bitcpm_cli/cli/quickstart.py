"""`bitcpm quickstart`: the whole pipeline on a tiny model, on the CPU, in a few minutes."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from bitcpm_cli.cli.output import LEVEL_STYLE, err, out, print_json
from bitcpm_cli.cli.training import TrainingProgress


def quickstart(
    output_dir: Path = typer.Option(Path("bitcpm-quickstart"), "--output-dir", "-o", help="Where everything goes."),
    json_output: bool = typer.Option(False, "--json", help="Print the result as JSON on stdout (progress stays on "
                                                           "stderr)."),
) -> None:
    """Run the whole pipeline on a tiny model on the CPU: build, train, sft, convert, infer, compare.

    Builds a tiny BitCPM-shaped model, trains it (ternary QAT), fine-tunes it, converts it (fused, packed), runs it as
    QAT checkpoint and as fused model, compares the two, and writes SUMMARY.md with the losses and generations.
    """
    from bitcpm_cli.core.quickstart import run_quickstart

    done_console = err if json_output else out
    with TrainingProgress(show=True, description="starting") as progress:
        def on_stage(stage: str, detail: str) -> None:
            if detail == "start":
                progress.stage(f"{stage} ...")
            else:
                done_console.print(f"[{LEVEL_STYLE['ok']}]done[/] {stage}: {escape(detail)}", soft_wrap=True)

        result = run_quickstart(output_dir, on_stage, progress.on_event)
    if json_output:
        print_json({**dataclasses.asdict(result), "correct": result.correct})
        return
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
