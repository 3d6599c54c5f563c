"""`bitcpm convert`: fuse the quantizer into pseudo-quantized weights, or pack them to 2 bits a weight."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import typer
from rich.markup import escape
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from bitcpm_cli.cli.output import LEVEL_STYLE, err, out, print_json


def convert(
    input_path: Path = typer.Option(..., "--input", "--input-bin", "--input_bin", "-i",
                                    help="QAT / float / fused / packed model folder, or a .safetensors / .bin file."),
    output: Path = typer.Option(..., "--output", "-o",
                                help="Output folder, or a single file ending in .safetensors or .bin."),
    quant_type: Optional[str] = typer.Option(None, "--quant-type", "--quant_type",
                                             help="ternary, binary, int2, int4, int8 (default: the checkpoint's)."),
    group_size: Optional[int] = typer.Option(None, "--group-size", "--group_size",
                                             help="-1 per row, 0 per tensor, N input channels (default: the checkpoint's)."),
    scheme: Optional[Path] = typer.Option(None, "--scheme", help="Scheme file: a bitcpm_quant block or a CANN strategy."),
    fmt: str = typer.Option("fused", "--format", help="fused (bf16 weights stock transformers/vLLM load), packed (2-bit) "
                                                      "or gguf (llama.cpp ternary blocks)."),
    gguf_type: str = typer.Option("tq2_0", "--gguf-type", help="GGUF block type of the linears: tq2_0, tq1_0 (exact or "
                                                               "refused) or auto (per tensor the smallest exact one of "
                                                               "TQ2_0, Q4_0, Q8_0: any group size that is a multiple "
                                                               "of 32; Q4_0 / Q8_0 first for a model trained with "
                                                               "activations q8_0)."),
    gguf_embeddings: str = typer.Option("f16", "--gguf-embeddings", help="GGUF embeddings / output layer: f16, bf16 "
                                                                         "or q8_0."),
    allow_lossy: bool = typer.Option(False, "--allow-lossy", help="GGUF: export even where blocks are not exact, and "
                                                                   "report the error."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="Output dtype of a fused or packed model: bfloat16 (the "
                                        "default), float16 or float32. A GGUF holds the float16 fused model (bfloat16 "
                                        "with --gguf-embeddings bf16)."),
    verify: bool = typer.Option(False, "--verify", help="Reload the output and check it against the input."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output (only once the new one is complete)."),
    max_shard_size: str = typer.Option("5GB", "--max-shard-size", help="Largest safetensors shard of a folder output."),
    json_output: bool = typer.Option(False, "--json", help="Print the result as JSON on stdout."),
) -> None:
    """Fuse a ternary QAT checkpoint into pseudo-quantized weights (exactly the QAT forward), or pack it.

    Replaces `qat-convert.py --input_bin ckpt.bin --output fused.bin --quant_type ternary --group_size -1`.
    """
    from bitcpm_cli.core.conversion.formats import convert as convert_to
    from bitcpm_cli.core.conversion.formats import reports_progress

    with _progress_bar(disable=json_output or not err.is_terminal or not reports_progress(fmt)) as progress:
        result = convert_to(fmt, input_path, output, quant_type=quant_type, group_size=group_size, scheme_file=scheme,
                            dtype=dtype, verify=verify, overwrite=overwrite, max_shard_size=max_shard_size,
                            gguf_type=gguf_type, embeddings=gguf_embeddings, allow_lossy=allow_lossy,
                            progress=progress)
    for warning in result.warnings:
        err.print(f"[bold yellow]WARNING:[/] {escape(warning)}", soft_wrap=True)
    if json_output:
        print_json(result.to_dict())
        return
    _renderer(result)(result)


@contextmanager
def _progress_bar(disable: bool) -> Iterator[Callable[[str, int, int], None]]:
    """A bar per stage ("convert", "verify") on stderr, for the formats that report progress."""
    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TimeRemainingColumn(),
                  console=err, transient=True, disable=disable) as bar:
        tasks: dict[str, int] = {}

        def progress(stage: str, advance: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total)
            bar.advance(tasks[stage], advance)

        yield progress


def _renderer(result: Any) -> Callable[[Any], None]:
    """The table printed for a result, by the result's type."""
    from bitcpm_cli.core.conversion.report import ConvertResult, GgufResult

    return {ConvertResult: _render, GgufResult: _render_gguf}[type(result)]


def _render_gguf(result) -> None:
    table = Table(title=f"GGUF {result.gguf_type.upper()}: {escape(result.output)}", show_header=False)
    table.add_row("architecture", result.architecture)
    table.add_row("tensors", f"{result.tensors} ({result.ternary_tensors} quantized linears)")
    table.add_row("tensor types", ", ".join(f"{name} x{count}" for name, count in sorted(result.tensor_types.items())))
    table.add_row("size", f"{result.bytes_out / 2**20:,.2f} MiB, {result.bits_per_weight:.3f} bits/weight "
                          f"(linears {result.linear_bits_per_weight:.3f})")
    table.add_row("read back", "every quantized linear decodes to the fused weights bit for bit" if result.exact
                  else f"max abs error {result.max_abs_error:g}")
    table.add_row("time", f"{result.seconds:.2f} s")
    out.print(table)
    for note in result.notes:
        out.print(f"note: {escape(note)}", soft_wrap=True)
    out.print(f"[{LEVEL_STYLE['ok']}]wrote[/] {escape(result.output)}")


def _render(result) -> None:
    table = Table(title=f"converted {escape(result.input)} -> {escape(result.output)}", show_header=False)
    table.add_row("input", f"{result.input_kind} checkpoint, {result.tensors_in} tensors, {result.bytes_in / 2**20:,.1f} MiB")
    table.add_row("output", f"{result.format}, {result.dtype}, {result.shards} file(s), {result.bytes_out / 2**20:,.1f} MiB")
    if result.scheme:
        table.add_row("scheme", f"{result.scheme['quant_type']}, group_size {result.scheme['group_size']}")
    if result.activations:
        table.add_row("activations", ", ".join(f"{scheme} in {n} linears" for scheme, n in result.activations.items())
                      + ("" if result.format == "packed" or result.output.endswith((".safetensors", ".bin"))
                         else " (recorded as bitcpm_activations)"))
    size = f"{result.quantized_bytes_out / 2**20:,.1f} MiB"
    if result.linear_ratio_vs_bf16 > 1:  # the linears are written smaller than in bf16 (packed codes and scales)
        size += f", {result.linear_ratio_vs_bf16:.2f}x smaller than bf16"
    table.add_row("quantized linears", f"{result.tensors_quantized} ({size})")
    table.add_row("input fingerprint", result.fingerprint)
    table.add_row("time", f"{result.seconds:.2f} s")
    out.print(table)
    for note in result.notes:
        out.print(f"note: {escape(note)}", soft_wrap=True)
    if result.verify is not None:
        layers = Table(title=f"verified: {result.verify.tensors_checked} tensors equal the reference")
        layers.add_column("layer")
        layers.add_column("zero fraction", justify="right")
        for layer, fraction in result.verify.per_layer().items():
            layers.add_row(layer, f"{fraction:.3f}")
        out.print(layers)
    out.print(f"[{LEVEL_STYLE['ok']}]wrote[/] {escape(result.output)}")
