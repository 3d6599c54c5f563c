"""`bitcpm compare`: two results files token by token (npu.json vs cpu.json), divergences explained."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table

from bitcpm_cli.cli.output import LEVEL_STYLE, out, print_json

STATUS_STYLE = {"match": LEVEL_STYLE["ok"], "near-tie": LEVEL_STYLE["warning"], "diverged": LEVEL_STYLE["error"],
                "only-in-a": LEVEL_STYLE["warning"], "only-in-b": LEVEL_STYLE["warning"]}


def compare(
    a: Path = typer.Argument(..., help="First results file (e.g. npu.json)."),
    b: Path = typer.Argument(..., help="Second results file (e.g. cpu.json)."),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="Compare only the first N tokens of each prompt."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Write the full report (JSON) to this file."),
    json_output: bool = typer.Option(False, "--json", help="Print the full report as JSON on stdout (no table)."),
    tie_margin: float = typer.Option(0.1, "--tie-margin", help="Top-1/top-2 logprob margin (nats) below which a flip "
                                                               "is a near tie."),
    allow_near_ties: bool = typer.Option(False, "--allow-near-ties", help="Count near-tie flips as matches."),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="Model or tokenizer folder to decode tokens."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Allow the tokenizer folder's own "
                                           "Python code."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing report file."),
) -> None:
    """Compare token ids prompt by prompt; exit 0 when all match, 1 otherwise.

    Accepts `bitcpm infer` results and bare lists of objects with `token_ids`.
    """
    from bitcpm_cli.core.evaluation.compare import check_options, compare_results, require_identical
    from bitcpm_cli.core.io.outputs import check_output_path, write_json
    from bitcpm_cli.core.model.hf import load_tokenizer

    check_options(max_tokens, tie_margin)  # before the tokenizer loads
    inputs = [a, b, tokenizer]
    if output is not None:
        check_output_path(output, inputs, overwrite)
    decoder = load_tokenizer(tokenizer, trust_remote_code) if tokenizer is not None else None
    report = compare_results(a, b, max_tokens=max_tokens, tie_margin=tie_margin, allow_near_ties=allow_near_ties,
                             tokenizer=decoder)
    if output is not None:  # written first: a refused write leaves nothing on stdout either
        write_json(report.to_dict(), output, inputs, overwrite)
    if json_output:
        print_json(report.to_dict())
    else:
        _render(report)
        if output is not None:
            out.print(f"wrote {escape(str(output))}")
    require_identical(report)


def _token(token: int | None, text: str | None) -> str:
    if token is None:
        return "(end)"
    return f"{token} {json.dumps(text, ensure_ascii=False)}" if text is not None else str(token)


def _render(report) -> None:
    table = Table(title=f"{escape(report.a)} vs {escape(report.b)} (matched by {report.matched_by})")
    for column in ("id", "prompt", "compared", "matched", "first divergence", "token A", "token B", "status"):
        table.add_column(column)
    for p in report.prompts:
        prompt = (p.prompt or "")[:30] + ("..." if p.prompt and len(p.prompt) > 30 else "")
        table.add_row(str(p.id), escape(prompt), str(p.compared), str(p.matched),
                      "-" if p.divergence is None else str(p.divergence),
                      escape(_token(p.token_a, p.text_a)) if p.divergence is not None else "-",
                      escape(_token(p.token_b, p.text_b)) if p.divergence is not None else "-",
                      f"[{STATUS_STYLE[p.status]}]{p.status}[/]")
    out.print(table)
    for note in report.notes:
        out.print(f"note: {escape(note)}", soft_wrap=True)
    for p in report.prompts:
        if p.status != "match":
            out.print(f"prompt {p.id}: {escape(p.explanation)}", soft_wrap=True)
        if p.max_logprob_diff is not None:
            out.print(f"prompt {p.id}: largest top-1 logprob difference over the common prefix "
                      f"{p.max_logprob_diff:.4g} (token {p.max_logprob_diff_at})", soft_wrap=True)
    matched = sum(p.status == "match" for p in report.prompts)
    style = LEVEL_STYLE["ok"] if report.ok else LEVEL_STYLE["error"]
    out.print(f"[{style}]{matched}/{len(report.prompts)} prompts identical[/]")
