"""The output formats of `bitcpm convert --format`: one table, `OUTPUT_FORMATS`, and one way in, `convert`.

A new output format is one runner (a `ConvertRequest` in, a result with `warnings` and `to_dict()` out) and one
entry in `OUTPUT_FORMATS`; `--format NAME` reaches it, and an unknown name is refused listing the table. The CLI
renders a result by its type: a runner that returns a new result type adds a renderer in `cli/convert.py`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from bitcpm_cli.core.conversion.convert import convert_checkpoint
from bitcpm_cli.core.conversion.plan import CHECKPOINT_FORMATS, ProgressFn
from bitcpm_cli.core.conversion.report import ConvertResult, GgufResult
from bitcpm_cli.core.errors import InputError

SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)\s*$", re.IGNORECASE)
UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
         "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


def parse_size(text: str) -> int:
    """`--max-shard-size`: "5GB", "500MB", "2GiB" -> bytes."""
    match = SIZE_RE.match(text)
    unit = match.group(2).upper() if match else None
    if not match or unit not in UNITS:
        raise InputError(f"--max-shard-size {text!r} is not a size", hint="e.g. 5GB, 500MB or 2GiB")
    return int(float(match.group(1)) * UNITS[unit])


@dataclass
class ConvertRequest:
    """Every option of `bitcpm convert`; each format's runner takes the ones it uses."""

    source: Path
    output: Path
    fmt: str
    quant_type: str | None = None
    group_size: int | None = None
    scheme_file: str | Path | None = None
    dtype: str | None = None  # fused / packed: bfloat16 when None; GGUF decides its own (refused when given)
    verify: bool = False
    overwrite: bool = False
    max_shard_size: str = "5GB"  # parsed only by the formats that write shards
    gguf_type: str = "tq2_0"
    embeddings: str = "f16"
    allow_lossy: bool = False
    progress: ProgressFn | None = None  # called only by the formats that declare `progress`


@dataclass(frozen=True)
class OutputFormat:
    run: Callable[[ConvertRequest], Any]
    purpose: str  # what the format is for, in the hint of an unknown --format
    progress: bool = False  # whether `run` reports progress through `ConvertRequest.progress`


def _write_checkpoint(request: ConvertRequest) -> ConvertResult:
    return convert_checkpoint(
        request.source, request.output, quant_type=request.quant_type, group_size=request.group_size,
        scheme_file=request.scheme_file, fmt=request.fmt, dtype=request.dtype or "bfloat16", verify=request.verify,
        overwrite=request.overwrite, max_shard_bytes=parse_size(request.max_shard_size), progress=request.progress,
    )


def _export_gguf(request: ConvertRequest) -> GgufResult:
    # Imported here, so that the other formats never need gguf-py (an optional extra).
    from bitcpm_cli.core.conversion.gguf.export import export_gguf

    if request.dtype is not None:  # never dropped in silence: the file's dtype follows --gguf-embeddings
        raise InputError(f"--dtype {request.dtype} does not apply to --format gguf: the file holds the float16 fused "
                         "model (its blocks store fp16 scales), or the bfloat16 one with --gguf-embeddings bf16",
                         hint="drop --dtype; pass --gguf-embeddings bf16 for bfloat16 embeddings and scales")
    return export_gguf(request.source, request.output, gguf_type=request.gguf_type, embeddings=request.embeddings,
                       allow_lossy=request.allow_lossy, overwrite=request.overwrite, quant_type=request.quant_type,
                       group_size=request.group_size, scheme_file=request.scheme_file)


# fused and packed: the checkpoint layouts plan.py plans and convert_checkpoint writes; gguf: llama.cpp's file.
OUTPUT_FORMATS: dict[str, OutputFormat] = {
    **{name: OutputFormat(_write_checkpoint, purpose, progress=True) for name, purpose in CHECKPOINT_FORMATS.items()},
    "gguf": OutputFormat(_export_gguf, "llama.cpp"),
}


def output_format(fmt: str) -> OutputFormat:
    """The table's entry for `--format fmt`, or the refusal that lists the table."""
    if fmt not in OUTPUT_FORMATS:
        raise InputError(f"--format {fmt!r} is not one of {', '.join(OUTPUT_FORMATS)}",
                         hint=", ".join(f"{name} for {entry.purpose}" for name, entry in OUTPUT_FORMATS.items()))
    return OUTPUT_FORMATS[fmt]


def reports_progress(fmt: str) -> bool:
    """Whether `--format fmt` reports progress (False for a name not in the table)."""
    entry = OUTPUT_FORMATS.get(fmt)
    return entry is not None and entry.progress


def convert(fmt: str, source: str | Path, output: str | Path, **options: Any) -> Any:
    """`bitcpm convert`: `source` written to `output` in the output format `fmt`, by the table's runner.

    `options` are `ConvertRequest`'s fields; the result is the runner's (`ConvertResult`, `GgufResult`, ...).
    """
    entry = output_format(fmt)
    return entry.run(ConvertRequest(Path(source), Path(output), fmt, **options))
