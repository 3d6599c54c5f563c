"""Options and rendering shared by the training commands (`train`, and `sft` built on the same stack)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import typer
from rich.markup import escape
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeRemainingColumn
from rich.table import Table

from bitcpm_cli.cli.output import LEVEL_STYLE, err, out, print_json

# Flags default to None so that only the ones given override the recipe (defaults < YAML < flags < key=value).
CONFIG = typer.Option(None, "--config", "-c", help="YAML recipe (see configs/).")
OVERRIDES = typer.Argument(None, help="key=value settings, applied last (e.g. lr=3e-4 max_steps=500).")
MODEL = typer.Option(None, "--model", "-m", help="Model folder: a QAT checkpoint or a float model.")
DATA = typer.Option(None, "--data", "-d", help="Data file (repeatable).")
OUTPUT_DIR = typer.Option(None, "--output-dir", "-o", help="Where checkpoints, metrics and final/ go.")
MAX_STEPS = typer.Option(None, "--max-steps", help="Optimizer steps.")
QUANT_TYPE = typer.Option(None, "--quant-type", help="ternary (default), binary, int2/4/8, or none (full precision).")
GROUP_SIZE = typer.Option(None, "--group-size", help="-1 per row, 0 per tensor, N input channels.")
SCHEME = typer.Option(None, "--scheme", help="Scheme file: a bitcpm_quant block or a CANN strategy.")
ACTIVATIONS = typer.Option(None, "--activations", help="Fake-quantize every quantized linear's input as it is served: "
                           "none, int8-token (BitNet b1.58), q8_k (llama.cpp TQ1_0/TQ2_0), q8_0 (Q4_0/Q8_0). "
                           "Default: the checkpoint's or the --scheme file's.")
LR = typer.Option(None, "--lr", help="Peak learning rate.")
BATCH_SIZE = typer.Option(None, "--batch-size", help="Sequences per device per micro-batch.")
GRAD_ACCUM = typer.Option(None, "--grad-accum", help="Micro-batches per optimizer step.")
SAVE_STEPS = typer.Option(None, "--save-steps", help="Checkpoint every N steps.")
LOGGING_STEPS = typer.Option(None, "--logging-steps", help="Log every N steps.")
SEED = typer.Option(None, "--seed")
DEVICE = typer.Option(None, "--device", help="auto, cpu, cuda[:N], npu[:N]; a missing one is an error.")
BF16 = typer.Option(None, "--bf16/--no-bf16", help="bf16 mixed precision (fp32 latent weights).")
DEEPSPEED = typer.Option(None, "--deepspeed", help="DeepSpeed JSON (e.g. configs/deepspeed/zero2.json).")
RESUME = typer.Option(None, "--resume", help="Continue from the latest complete checkpoint in --output-dir.")
TEACHER = typer.Option(None, "--teacher", help="Full-precision teacher folder for knowledge distillation.")
TRUST_REMOTE_CODE = typer.Option(None, "--trust-remote-code", help="Allow the model folder's own Python code.")
LIST_SETTINGS = typer.Option(False, "--list-settings", help="Show every setting (bitcpm's and every "
                             "transformers TrainingArguments field) with its default, then exit.")


def render_settings(config_class: type, json_output: bool = False) -> None:
    """Every key=value / recipe setting with its default: one `name = default` line each; with --json, a JSON list
    of {name, default, aliases, source} (defaults JSON cannot hold, such as enum members, as their repr)."""
    from bitcpm_cli.core.training.recipe import list_settings

    if json_output:
        print_json([{**row, "default": _json_value(row["default"])} for row in list_settings(config_class)])
        return
    out.print("# settings: key=value on the command line, or `name: value` in a --config recipe", highlight=False)
    source = None
    for row in list_settings(config_class):
        if row["source"] != source and not row["source"].startswith("refused"):
            source = row["source"]
            out.print(f"# {'bitcpm' if source == 'bitcpm' else 'transformers TrainingArguments'}", highlight=False)
        line = f"{row['name']} = {row['default']!r}"
        if row["aliases"]:
            line += f"  (also: {', '.join(row['aliases'])})"
        if row["source"].startswith("refused"):
            line += f"  [{row['source']}]"
        out.print(escape(line), highlight=False, soft_wrap=True)


def _json_value(value: Any) -> Any:
    """A setting's default as JSON holds it: JSON types as they are, enum members by value, anything else as repr."""
    import enum
    import json

    if isinstance(value, enum.Enum):
        value = value.value
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return repr(value)
    return value


JSON = typer.Option(False, "--json", help="Print the result as JSON on stdout (progress stays on stderr).")


def flags(**values: Any) -> dict[str, Any]:
    """The flags that were given, with Paths as strings and lists as lists."""
    out_values = {}
    for key, value in values.items():
        if value is None or value == []:
            continue
        if isinstance(value, Path):
            value = str(value)
        elif isinstance(value, (list, tuple)):
            value = [str(v) for v in value]
        out_values[key] = value
    return out_values


class TrainingProgress:
    """The live line of every training run (train, sft, quickstart): stage, step n/N, bar, loss, lr, tokens/s, zeros
    and ETA on stderr; off a terminal, one plain line per logged step instead. Main process only."""

    def __init__(self, show: bool, total: int | None = None, description: str = "train"):
        self.show = show
        self.bar = Progress(SpinnerColumn(), TextColumn("{task.description}"), TextColumn("{task.fields[steps]}"),
                            BarColumn(), TextColumn("{task.fields[status]}"), TimeRemainingColumn(), console=err,
                            disable=not show or not err.is_terminal)
        self.task = self.bar.add_task(description, total=total, steps=self._steps(0, total), status="starting")

    @staticmethod
    def _steps(step: int, total: int | None) -> str:
        return f"step {step}/{total}" if total else ""

    def __enter__(self) -> "TrainingProgress":
        self.bar.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.bar.stop()

    def stage(self, description: str) -> None:
        self.bar.reset(self.task, total=None, description=description, steps="", status="")

    def on_event(self, event: dict) -> None:
        if not self.show:  # other ranks of a multi-process run stay quiet
            return
        if "phase" in event:  # loading, preparing, the memory plan: shown from the first second
            if "lines" in event:
                err.print("memory plan: " + "; ".join(event["lines"]), highlight=False, soft_wrap=True)
                return
            self.bar.update(self.task, status=event["phase"])
            if not err.is_terminal:
                err.print(f"{event['phase']} ...", highlight=False)
            return
        status = f"loss {event['loss']:.4f}  lr {event['lr'] or 0:.2e}"
        if event.get("tokens_per_s"):
            status += f"  {event['tokens_per_s']:,.0f} tok/s"
        if "zero_fraction" in event:
            status += f"  zeros {event['zero_fraction']:.3f}"
        steps = self._steps(event["step"], event["max_steps"])
        self.bar.update(self.task, completed=event["step"], total=event["max_steps"], steps=steps, status=status)
        if not err.is_terminal:
            err.print(f"{steps}  {status}", highlight=False)


def run_with_progress(run: Callable[[Callable[[dict], None]], Any], show: bool, total: int | None = None) -> Any:
    """Run a training job under the live line; `total` (max_steps) is shown from the start."""
    with TrainingProgress(show, total) as progress:
        return run(progress.on_event)


def print_result_json(result: Any) -> None:
    """--json: the run's result (a dataclass) on stdout."""
    import dataclasses

    print_json(dataclasses.asdict(result))


def render_result(result: Any, title: str) -> None:
    table = Table(title=title, show_header=False)
    table.add_row("steps", str(result.steps))
    if result.first_loss is not None:
        table.add_row("loss", f"{result.first_loss:.4f} -> {result.last_loss:.4f}")
    table.add_row("scheme", "full precision" if result.scheme is None else
                  f"{result.scheme['quant_type']}, group_size {result.scheme['group_size']}")
    if result.activations is not None:
        table.add_row("activations", result.activations)
    table.add_row("final checkpoint", escape(result.final_dir))
    table.add_row("metrics", escape(str(Path(result.output_dir) / "metrics.jsonl")))
    out.print(table)
    for note in result.notes:
        out.print(f"note: {escape(note)}", soft_wrap=True)
    out.print(f"[{LEVEL_STYLE['ok']}]done[/]: convert with `bitcpm convert --input {escape(result.final_dir)} "
              "--output FUSED`", soft_wrap=True)

