"""`bitcpm eval`: perplexity and KL divergence to a reference, every model scoring the same token ids."""

from __future__ import annotations

from pathlib import Path
from typing import Any, List, Optional

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from bitcpm_cli.cli.infer import ACTIVATIONS_HELP
from bitcpm_cli.cli.output import LEVEL_STYLE, err, out, print_json
from bitcpm_cli.core.errors import InputError


def evaluate(
    model: List[Path] = typer.Option(..., "--model", "-m", help="Float, QAT, fused or packed model folder, or a .gguf "
                                     "file (repeatable)."),
    data: Path = typer.Option(..., "--data", help="Held-out text: .txt (one document a line), .jsonl (`text`) or "
                              ".parquet (`text`)."),
    reference: Optional[Path] = typer.Option(None, "--reference", help="The model the others are compared with "
                                             "(default: the first --model); its tokenizer tokenizes the corpus."),
    context: int = typer.Option(512, "--context", help="Tokens per window (llama.cpp scoring: per chunk, "
                                "llama-perplexity's -c)."),
    scoring: str = typer.Option("windows", "--scoring", help="windows: documents in sliding windows (default); "
                                "llama.cpp: llama-perplexity's chunks of the .txt file as one string, exactly."),
    stride: Optional[int] = typer.Option(None, "--stride", help="Tokens between windows (default: context / 2); "
                                         "every token after the first is scored once."),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="Score only the corpus' first N tokens."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda[:N], npu[:N] or mps (llama.cpp: cpu)."),
    dtype: str = typer.Option("float32", "--dtype", help="float32, bfloat16 or float16 (transformers models)."),
    tasks: Optional[str] = typer.Option(None, "--tasks", help="lm-evaluation-harness tasks, comma-separated (the "
                                        "eval extra)."),
    include_path: Optional[Path] = typer.Option(None, "--include-path", help="Folder of local task YAML files."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Write the report (bitcpm.eval/1) to this "
                                          "file."),
    as_json: bool = typer.Option(False, "--json", help="Print the report (bitcpm.eval/1) as JSON on stdout."),
    max_kld: Optional[float] = typer.Option(None, "--max-kld", help="Exit 1 when a model's mean KLD exceeds this."),
    min_top1: Optional[float] = typer.Option(None, "--min-top1", help="Exit 1 when a model's same-top-token % is "
                                             "below this."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Allow model folders' and task "
                                           "files' (--include-path) own Python code."),
    per_token: Optional[Path] = typer.Option(None, "--per-token", help="Write each scored token's NLL (and KLD / "
                                             "same top token against the reference) to this JSON Lines file."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --output / --per-token file."),
    activations: Optional[str] = typer.Option(None, "--activations", help=ACTIVATIONS_HELP),
) -> None:
    """Score every model on the same tokens: perplexity, and against the reference the KL divergence, its 99th
    percentile and maximum, top-token agreement and RMS probability change (llama.cpp's perplexity tool's names)."""
    from bitcpm_cli.core.evaluation.perplexity import check_gates, plan_eval, run_eval, scheme, short_names
    from bitcpm_cli.core.io.outputs import check_output_path, write_json

    inputs = [*model, data, reference, include_path]
    if output is not None:
        check_output_path(output, inputs, overwrite)
    if per_token is not None:
        if output is not None and per_token.resolve() == output.resolve():
            raise InputError(f"--per-token and --output name the same file ({per_token})",
                             hint="write the per-token file and the report to two paths")
        check_output_path(per_token, inputs, overwrite, what="--per-token")
    task_list = [t.strip() for t in tasks.split(",") if t.strip()] if tasks else None
    plan = plan_eval(model, data, reference=reference, context=context, stride=stride, max_tokens=max_tokens,
                     device=device, dtype=dtype, trust_remote_code=trust_remote_code, tasks=task_list,
                     include_path=include_path, max_kld=max_kld, min_top1=min_top1, scoring=scoring,
                     per_token=per_token, overwrite=overwrite, activations=activations)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("tokens"),
               TimeRemainingColumn())
    progress = Progress(*columns, console=err, transient=True, disable=not err.is_terminal)
    bars: dict[str, Any] = {}

    def on_progress(label: str, done: int, total: int) -> None:
        if not bars:
            progress.start()  # only once scoring runs: an error before it leaves stderr clean
        if label not in bars:
            bars[label] = progress.add_task(escape(label), total=total)
        progress.update(bars[label], completed=done)

    try:
        report = run_eval(plan, on_progress)
    finally:
        if bars:
            progress.stop()
    if output is not None:
        write_json(report, output, inputs, overwrite)
    if as_json:
        print_json(report)
    else:
        _render(report, output, short_names(report), scheme(report["settings"]))
    check_gates(report)


def _render(report: dict, output: Path | None, name, how: str) -> None:
    """One column a model, one row a figure (fits a terminal for several models)."""
    data = report["data"]
    table = Table(title=f"{data['scored_tokens']:,} tokens of {escape(data['path'])}, context "
                        f"{report['settings']['context']}, {how}",
                  caption="KLD, same top and RMS Δp: against the reference (ref)")
    table.add_column("")
    for m in report["models"]:
        table.add_column(escape(name(m["path"])) + (" (ref)" if m["reference"] else ""), justify="right")
    models = report["models"]

    def versus(key: str, spec: str) -> list[str]:
        return [format(m["vs_reference"][key], spec) if "vs_reference" in m else "-" for m in models]

    table.add_row("format", *[f"{m['format']} {m['dtype']}" for m in models])
    table.add_row("activations", *[escape(m.get("activations", "none")) for m in models])
    table.add_row("PPL", *[f"{m['ppl']:.4g}" for m in models])
    table.add_row("PPL 95 %", *[f"{m['ppl_95'][0]:.4g}-{m['ppl_95'][1]:.4g}" for m in models])
    if report["settings"].get("scoring") == "llama.cpp":  # as llama-perplexity prints its final estimate
        table.add_row("llama.cpp PPL", *[escape(m["llama_cpp"]["final_estimate"].removeprefix("Final estimate: PPL = "))
                                         for m in models])
    table.add_row("mean KLD", *versus("mean_kld", ".4g"))
    table.add_row("99 % KLD", *versus("p99_kld", ".4g"))
    table.add_row("max KLD", *versus("max_kld", ".4g"))
    table.add_row("same top %", *versus("same_top_pct", ".2f"))
    table.add_row("RMS Δp %", *versus("rms_dp_pct", ".3g"))
    table.add_row("tokens/s", *[f"{m['tokens_per_s']:.0f}" if m["tokens_per_s"] else "-" for m in models])
    for task in report["settings"]["tasks"]:
        cells = []
        for m in models:
            scores, kept = m.get("tasks"), (m.get("tasks_kept_pct") or {}).get(task)
            if not scores:
                cells.append("n/a")
                continue
            metric, value = next(iter(scores[task].items()))
            cells.append(f"{metric} {value:.3f}" + (f" ({kept:.1f} %)" if kept is not None else ""))
        table.add_row(f"{escape(task)} (kept)", *cells)
    out.print(table)
    for m in report["models"]:
        for note in m["notes"]:
            out.print(f"note: {escape(name(m['path']))}: {escape(note)}", soft_wrap=True)
    for note in report["notes"]:
        out.print(f"note: {escape(note)}", soft_wrap=True)
    if output is not None:
        out.print(f"[{LEVEL_STYLE['ok']}]wrote[/] {escape(str(output))}")
