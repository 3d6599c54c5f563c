"""`bitcpm sft`: supervised fine-tuning of a ternary QAT model on chat data (loss on assistant turns only)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer
from rich.markup import escape
from rich.table import Table

from bitcpm_cli.cli import training as opt
from bitcpm_cli.cli.output import out, print_json
from bitcpm_cli.core.runtime.device import is_main_process

SUPERVISED_OPEN, SUPERVISED_CLOSE = "[[", "]]"  # --preview off a terminal


def sft(
    overrides: Optional[List[str]] = opt.OVERRIDES,
    config: Optional[Path] = opt.CONFIG,
    model: Optional[Path] = opt.MODEL,
    data: Optional[List[Path]] = opt.DATA,
    output_dir: Optional[Path] = opt.OUTPUT_DIR,
    max_steps: Optional[int] = opt.MAX_STEPS,
    quant_type: Optional[str] = opt.QUANT_TYPE,
    group_size: Optional[int] = opt.GROUP_SIZE,
    scheme: Optional[Path] = opt.SCHEME,
    activations: Optional[str] = opt.ACTIVATIONS,
    lr: Optional[float] = opt.LR,
    batch_size: Optional[int] = opt.BATCH_SIZE,
    grad_accum: Optional[int] = opt.GRAD_ACCUM,
    max_length: Optional[int] = typer.Option(None, "--max-length", help="Tokens per example (longer ones are cut)."),
    packing: Optional[bool] = typer.Option(None, "--packing/--no-packing", help="Pack short examples together."),
    template: Optional[str] = typer.Option(None, "--template", help="auto (tokenizer's, ChatML if none), chatml, or "
                                                                    "a .jinja file."),
    data_format: Optional[str] = typer.Option(None, "--format", metavar="FORMAT",
                                              help="alpaca, sharegpt or openai (default: detected per file)."),
    columns: Optional[List[str]] = typer.Option(None, "--columns", metavar="KEY=FIELD|dataset_info.json",
                                                help="LLaMA-Factory column/tag mapping, e.g. prompt=question or "
                                                     "role_tag=who (repeatable), or a dataset_info.json."),
    preview: int = typer.Option(0, "--preview", help="Print the first N rendered examples with the supervised spans, "
                                                     "then exit."),
    save_steps: Optional[int] = opt.SAVE_STEPS,
    logging_steps: Optional[int] = opt.LOGGING_STEPS,
    seed: Optional[int] = opt.SEED,
    device: Optional[str] = opt.DEVICE,
    bf16: Optional[bool] = opt.BF16,
    deepspeed: Optional[Path] = opt.DEEPSPEED,
    resume: Optional[bool] = opt.RESUME,
    teacher: Optional[Path] = opt.TEACHER,
    trust_remote_code: Optional[bool] = opt.TRUST_REMOTE_CODE,
    list_settings: bool = opt.LIST_SETTINGS,
    json_output: bool = opt.JSON,
) -> None:
    """Fine-tune on OpenAI messages, ShareGPT or Alpaca data (.json / .jsonl) under the ternary fake quantizer.

    Conversations are rendered with the tokenizer's chat template; only assistant turns (and their end-of-turn
    token) carry loss. Same training stack and outputs as `bitcpm train`.
    """
    from bitcpm_cli.core.errors import InputError
    from bitcpm_cli.core.training.recipe import resolve_config
    from bitcpm_cli.core.training.sft import SftConfig, fine_tune

    if list_settings:
        opt.render_settings(SftConfig, json_output)
        return
    given = opt.flags(
        model=model, data=data, output_dir=output_dir, max_steps=max_steps, quant_type=quant_type,
        group_size=group_size, scheme=scheme, activations=activations, lr=lr, batch_size=batch_size,
        grad_accum=grad_accum,
        max_length=max_length, packing=packing, template=template, format=data_format, columns=columns,
        save_steps=save_steps,
        logging_steps=logging_steps, seed=seed, device=device, bf16=bf16, deepspeed=deepspeed, resume=resume,
        teacher=teacher, trust_remote_code=trust_remote_code,
    )
    if preview:
        if preview < 0:
            raise InputError(f"--preview {preview} must be positive", hint="e.g. --preview 3")
        given.setdefault("output_dir", "-")  # preview writes nothing
        _preview(resolve_config(SftConfig, config, given, overrides), preview, json_output)
        return
    settings = resolve_config(SftConfig, config, given, overrides)
    result = opt.run_with_progress(lambda on_event: fine_tune(settings, on_event=on_event), is_main_process(),
                                   settings.max_steps)
    if is_main_process() and json_output:
        opt.print_result_json(result)
    elif is_main_process():
        _data_summary(result.data_summary)
        opt.render_result(result, "fine-tuning finished")


def _data_summary(summary: dict) -> None:
    table = Table(title="data", show_header=False)
    for key in ("conversations", "examples_used", "skipped_abnormal", "skipped_no_assistant_turn",
                "dropped_by_truncation", "truncated", "sequences", "tokens", "supervised_tokens"):
        table.add_row(key.replace("_", " "), f"{summary.get(key, 0):,}")
    out.print(table)
    for note in summary.get("notes", []):
        out.print(f"note: {escape(note)}", soft_wrap=True)


def _preview(settings, count: int, json_output: bool = False) -> None:
    import dataclasses

    from bitcpm_cli.core.errors import InputError
    from bitcpm_cli.core.model.hf import load_tokenizer
    from bitcpm_cli.core.training.sft import preview

    if not Path(settings.model).is_dir():
        raise InputError(f"model folder not found ({settings.model})", hint="the tokenizer is read from it")
    examples, summary, notes = preview(settings, load_tokenizer(settings.model, settings.trust_remote_code), count)
    if json_output:  # --json: the examples (text segments with their supervised flag) and the data summary only
        print_json({"examples": [dataclasses.asdict(e) for e in examples], "summary": {**summary, "notes": notes}})
        return
    for index, example in enumerate(examples):
        out.rule(f"example {index}: {example.tokens} tokens, {example.supervised_tokens} supervised")
        for text, supervised in example.segments:
            if not out.is_terminal:  # colour is lost in a pipe or file: mark the supervised spans in the text
                text = f"{SUPERVISED_OPEN}{text}{SUPERVISED_CLOSE}" if supervised else text
            out.print(escape(text), style="bold green" if supervised else "dim", end="", soft_wrap=True)
        out.print()
    if out.is_terminal:
        out.print("[bold green]green[/]: supervised (loss); [dim]dim[/]: masked")
    else:
        out.print(f"{SUPERVISED_OPEN}...{SUPERVISED_CLOSE}: supervised (loss); the rest is masked")
    summary["notes"] = notes
    _data_summary(summary)
    out.print(json.dumps({k: summary[k] for k in ("examples_used", "supervised_tokens")}), highlight=False)
