"""`convert`: fuse the quantizer into a checkpoint, pack it to 2 bits a weight, or unpack it, streaming.

One tensor is in memory at a time (safetensors in and out): the output header is laid out from the input headers
before any data is read, then every tensor is read, transformed and written in turn. Everything is written into a
temporary path beside the output and renamed into place at the end, so a failure leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections import Counter
from contextlib import closing, nullcontext
from pathlib import Path
from typing import Iterator

import torch

from bitcpm_cli.core.conversion.plan import ConversionPlan, ProgressFn, Transform, plan_conversion
from bitcpm_cli.core.conversion.report import ConvertResult, VerifyReport
from bitcpm_cli.core.conversion.verify import Checker, InMemory, Verifier, read_back_bin
from bitcpm_cli.core.conversion.write import ShardedWriter, write_folder_files
from bitcpm_cli.core.errors import CheckFailed
from bitcpm_cli.core.formats.packed import packed_base
from bitcpm_cli.core.io.background import BackgroundIO, prefetched
from bitcpm_cli.core.io.outputs import OutputGuard
from bitcpm_cli.core.io.safetensors import tensor_nbytes
from bitcpm_cli.core.model.checkpoint import iter_tensors
from bitcpm_cli.core.model.inference_ready import make_inference_ready

DEFAULT_MAX_SHARD_BYTES = 5 * 10**9


def convert_checkpoint(
    source: str | Path,
    output: str | Path,
    *,
    quant_type: str | None = None,
    group_size: int | None = None,
    scheme_file: str | Path | None = None,
    fmt: str = "fused",
    dtype: str = "bfloat16",
    verify: bool = False,
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    progress: ProgressFn | None = None,
) -> ConvertResult:
    """A QAT, float, fused or packed checkpoint -> a fused or packed one (`fmt`), one tensor in memory at a time."""
    started = time.perf_counter()
    source, output = Path(source), Path(output)
    single = output.name if output.suffix in (".safetensors", ".bin") else None
    plan = plan_conversion(source, output, quant_type=quant_type, group_size=group_size, scheme_file=scheme_file,
                           fmt=fmt, dtype=dtype, overwrite=overwrite)
    out_specs = plan.out_specs()
    transform = plan.transform()

    guard = OutputGuard(output, [source, scheme_file], overwrite=overwrite, kind="file" if single else "dir")
    staging = guard.claim()  # .bitcpm-tmp-<pid>-<name>: keeps the suffix, .bin stays .bin
    hasher = hashlib.sha256()
    try:
        if not single:
            staging.mkdir()
        bytes_in = sum(f.stat().st_size for f in plan.files.files)
        tensor_bytes = sum(spec.nbytes for spec in plan.specs.values())  # what the progress bars count to
        # Read and hashed a slice at a time on a thread of its own, while this one quantizes.
        tensors = prefetched(iter_tensors(plan.files, hasher))
        if single and single.endswith(".bin"):
            report, written = _convert_to_bin(plan, transform, tensors, staging, verify, progress, tensor_bytes)
        else:
            report, written = _convert_to_safetensors(plan, transform, out_specs, tensors, staging, single, verify,
                                                      max_shard_bytes, progress, tensor_bytes)
        result = _result(plan, source, output, out_specs, bytes_in, written, f"sha256:{hasher.hexdigest()}")
        if not single:
            write_folder_files(source, staging, plan.config, result, plan.fmt, plan.scheme, plan.targets, plan.mode,
                               plan.activations)
            result.notes += make_inference_ready(staging, source if source.is_dir() else None)
        elif plan.activations:
            result.notes.append(_unrecorded_activations(plan.activations, single))
        _attach_report(result, report)
        guard.commit()  # the old output (--overwrite) is removed only once the new one is complete
    except BaseException as exc:
        guard.abort(exc)
        raise
    result.seconds = time.perf_counter() - started
    return result


def _unrecorded_activations(activations: dict[str, str], single: str) -> str:
    """The note of a single-file output of a model that quantizes activations: nothing can record them there."""
    schemes = ", ".join(f"{scheme} in {n}" for scheme, n in sorted(Counter(activations.values()).items()))
    return (f"activations: {len(activations)} linear(s) were trained with quantized activations ({schemes}), and a "
            f"single file ({single}) has no config.json to record them: a model loaded from it runs them with "
            "full-precision activations; write a folder output to keep the bitcpm_activations record")


def _convert_to_bin(plan: ConversionPlan, transform: Transform, tensors: Iterator[tuple[str, torch.Tensor]],
                    staging: Path, verify: bool, progress: ProgressFn | None,
                    tensor_bytes: int) -> tuple[VerifyReport | None, list[Path]]:
    """A single .bin output: the whole state in memory, saved with torch.save (and read back with --verify)."""
    state: dict[str, torch.Tensor] = {}
    checker = Checker(plan, InMemory(state), progress, tensor_bytes) if verify else None
    with closing(tensors):
        for name, tensor in tensors:
            state.update(transform.apply(name, tensor))
            if checker is not None:
                checker.check(name, tensor)
            _tick(progress, "convert", tensor, tensor_bytes)
    torch.save(state, staging)
    if checker is None:
        return None, [staging]
    report = checker.report
    report.mismatches += read_back_bin(staging, state)
    return report, [staging]


def _convert_to_safetensors(plan: ConversionPlan, transform: Transform, out_specs: list[tuple[str, str, tuple]],
                            tensors: Iterator[tuple[str, torch.Tensor]], staging: Path, single: str | None,
                            verify: bool, max_shard_bytes: int, progress: ProgressFn | None,
                            tensor_bytes: int) -> tuple[VerifyReport | None, list[Path]]:
    """A folder of safetensors shards (or one .safetensors file), laid out from the plan and written in the
    background; with --verify each tensor is checked on a third thread against the output read back."""
    folder = staging.parent if single else staging
    writer = ShardedWriter(folder, out_specs, max_shard_bytes, plan.packed_shapes, staging.name if single else None)
    verifier = Verifier(plan, writer, progress, tensor_bytes) if verify else None
    unchanged = plan.unchanged(out_specs) if verify else frozenset()
    report = None
    # Quantizing here, writing the output in the background (and checking it on a third thread).
    try:
        with closing(tensors), verifier or nullcontext():
            with BackgroundIO(max_pending_bytes=64 * 2**20) as io:
                for name, tensor in tensors:
                    outputs = transform.apply(name, tensor)
                    for out_name, out_tensor in outputs:
                        io.submit(writer.write, out_name, out_tensor, nbytes=out_tensor.nbytes)
                    if verifier is not None:  # a tensor written unchanged is not held for its check
                        held = None if name in unchanged else tensor
                        io.submit(verifier.written, name, held, [n for n, _ in outputs],
                                  nbytes=0 if held is None else held.nbytes)
                    _tick(progress, "convert", tensor, tensor_bytes)
            writer.write_index()
            if verifier is not None:
                report = verifier.finish(staging)
    except BaseException:
        writer.abort()  # the background writes have stopped: close the open shard before it is removed
        raise
    return report, [folder / n for n in writer.names]


def _result(plan: ConversionPlan, source: Path, output: Path, out_specs: list[tuple[str, str, tuple]],
            bytes_in: int, written: list[Path], fingerprint: str) -> ConvertResult:
    """What the conversion wrote (the time is set at the end, the verification report once it is read)."""
    specs, targets, packed_shapes = plan.specs, plan.targets, plan.packed_shapes
    quantized_shapes = list(packed_shapes.values()) or [specs[n].shape for n in targets]
    quantized_bytes = sum(tensor_nbytes(dt, shape) for name, dt, shape in out_specs
                          if name in targets or packed_base(name) is not None
                          or name.removesuffix(".weight") in packed_shapes)
    return ConvertResult(
        input=str(source), output=str(output), format=plan.fmt, dtype=plan.dtype, input_kind=plan.input_kind,
        scheme=plan.scheme.to_dict() if plan.scheme and plan.mode != "unpack" else None,
        tensors_in=len(specs), tensors_quantized=len(targets) or len(packed_shapes), bytes_in=bytes_in,
        bytes_out=sum(p.stat().st_size for p in written), quantized_bytes_out=quantized_bytes,
        quantized_numel=sum(math.prod(shape) for shape in quantized_shapes), fingerprint=fingerprint, seconds=0.0,
        shards=len(written), notes=plan.notes, warnings=plan.warnings,
        activations=dict(sorted(Counter(plan.activations.values()).items())),
    )


def _attach_report(result: ConvertResult, report: VerifyReport | None) -> None:
    """--verify's report on the result; a failed one stops the conversion before its output is put in place."""
    if report is None:
        return
    result.verify = report
    if not report.ok:
        bad = report.mismatches + report.not_ternary
        raise CheckFailed(f"verification failed: {len(bad)} tensor(s) differ from the reference "
                          f"(first: {bad[0]})", hint="report this as a bug; nothing was written",
                          problems=bad[:20] if len(bad) > 1 else ())


def _tick(progress: ProgressFn | None, stage: str, tensor: torch.Tensor, total: int) -> None:
    if progress is not None:
        progress(stage, tensor.nbytes, total)
