"""GGUF export for llama.cpp: exact or refused, streamed one tensor at a time, written with gguf-py.

Every quantized linear is written in a block type that reproduces its fused weights bit for bit: TQ2_0 / TQ1_0
(blocks of 256 values of one row with one fp16 scale) when each block holds one scale group, Q4_0 (blocks of 32,
value `(q - 8) * d`, ternary codes as q in {7, 8, 9} with d = s) when each 32-block does, Q8_0 (blocks of 32 with
int8 codes) when the block's values are small integer multiples of one fp16 number. `--gguf-type auto` picks the
first that is exact, per tensor (the types whose activations match the linear's training ones first: llama.cpp
multiplies TQ blocks by Q8_K activations, Q4_0 / Q8_0 blocks by Q8_0 ones); `tq2_0` / `tq1_0` take that type or
refuse. A linear trained with other activations than its type's is one note of the result (never file metadata,
which llama.cpp would ignore).

What the scheme already decides (group sizes against block sizes) is decided from config.json and the tensor
headers before any weight is read. Then the file's header and tensor table are written, each tensor is fused,
encoded, checked by decoding and written in turn, and the header is written again with the types finally chosen
(its length does not depend on them). At the end the file is read back: every tensor's type, shape and bytes must be
the ones that were checked.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import time
from collections import Counter
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from bitcpm_cli.core.conversion.gguf.arch import select_architecture
from bitcpm_cli.core.conversion.gguf.vocab import write_tokenizer
from bitcpm_cli.core.conversion.plan import plan_conversion
from bitcpm_cli.core.conversion.report import GgufResult
from bitcpm_cli.core.errors import CheckFailed, InputError
from bitcpm_cli.core.formats.gguf_blocks import (
    GGUF_ACTIVATIONS,
    GGUF_ALIGNMENT,
    GGUF_BLOCKS,
    GGUF_FILE_TYPES,
    encode_block_type,
    gguf_nbytes,
    reproduces,
)
from bitcpm_cli.core.io.background import BackgroundIO
from bitcpm_cli.core.io.outputs import OutputGuard
from bitcpm_cli.core.model.hf import refuse_remote_code

GGUF_TYPES = ("tq2_0", "tq1_0", "auto")
EMBEDDING_TYPES = ("f16", "bf16", "q8_0")
NO_REMOTE_CODE_HINT = ("GGUF export never runs a folder's own code: export a folder whose tokenizer is a standard "
                       "tokenizer.json (no auto_map)")
AUTO_ORDER = ("TQ2_0", "Q4_0", "Q8_0")


@dataclass
class _Entry:
    """One tensor of the GGUF: where it comes from and how it is written."""

    source: str  # the checkpoint's name (or "" for a tensor the architecture adds)
    name: str  # the GGUF name
    shape: tuple[int, ...]
    type: str  # the ggml type (planned, then the one written)
    quantized: bool
    group_size: int | None = None
    digest: str = ""
    error: float = 0.0  # max abs error of the decoded values (0 unless --allow-lossy)
    activations: str = "none"  # how training quantized the input of a quantized linear

    @property
    def auto_order(self) -> tuple[str, ...]:
        """--gguf-type auto's candidate types, smallest first: those whose activations (llama.cpp's) are the ones
        this linear was trained with come first, so that a model trained with q8_0 gets Q4_0 / Q8_0 blocks."""
        matching = [t for t in AUTO_ORDER if GGUF_ACTIVATIONS[t] == self.activations]
        return tuple(matching + [t for t in AUTO_ORDER if t not in matching])

    @property
    def nbytes(self) -> int:
        return gguf_nbytes(self.type, math.prod(self.shape))


def block_problem(group_size: int, columns: int, block: int) -> str | None:
    """Why blocks of `block` values along rows of `columns` cannot each hold one scale group, or None."""
    if columns % block:
        return f"rows of {columns} values are not a multiple of {block}"
    if group_size > 0 and group_size % block:
        return f"group size {group_size} puts more than one scale in a block of {block}"
    return None


def _plan_type(entry: _Entry, gguf_type: str) -> tuple[str, str | None]:
    """The block type tried first for a quantized linear, and the problem when there is none."""
    columns = entry.shape[1]
    if gguf_type != "auto":
        problem = block_problem(entry.group_size, columns, GGUF_BLOCKS["TQ2_0"][1])
        return gguf_type.upper(), problem
    for type_name in entry.auto_order:
        block = GGUF_BLOCKS[type_name][1]
        if block_problem(entry.group_size if type_name != "Q8_0" else -1, columns, block) is None:
            return type_name, None
    return "Q8_0", f"rows of {columns} values are not a multiple of 32 (the smallest GGUF block)"


def _grouped(problems: dict[str, list[str]]) -> list[str]:
    """One line per problem with the layers that share it, e.g. 'model.layers.{0-27}.{mlp.up_proj, ...}'."""
    lines = []
    for problem, names in problems.items():
        kinds: dict[tuple[str, str], list[int]] = {}
        others = []
        for name in names:
            match = re.fullmatch(r"(.*\.layers\.)(\d+)\.(.*)", name.removesuffix(".weight"))
            if match:
                kinds.setdefault((match.group(1), match.group(3)), []).append(int(match.group(2)))
            else:
                others.append(name.removesuffix(".weight"))
        by_layers: dict[tuple[str, str], list[str]] = {}
        for (prefix, kind), layers in kinds.items():
            by_layers.setdefault((prefix, _ranges(sorted(layers))), []).append(kind)
        parts = [prefix + layers + "." + (kinds_[0] if len(kinds_) == 1 else "{" + ", ".join(sorted(kinds_)) + "}")
                 for (prefix, layers), kinds_ in by_layers.items()] + others
        lines.append(f"{problem}: {len(names)} linear(s): {'; '.join(parts)}")
    return lines


def _ranges(numbers: list[int]) -> str:
    spans, start = [], numbers[0]
    for previous, current in zip(numbers, numbers[1:] + [None]):
        if current != previous + 1:
            spans.append(str(start) if start == previous else f"{start}-{previous}")
            start = current
    return spans[0] if len(spans) == 1 and "-" not in spans[0] else "{" + ",".join(spans) + "}"


class _Recorder:
    """Collects gguf-py `add_*` calls so the same metadata can be written into several headers."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple, dict]] = []

    def __getattr__(self, method: str) -> Callable[..., None]:
        if not method.startswith("add_"):
            raise AttributeError(method)
        return lambda *args, **kwargs: self.calls.append((method, args, kwargs))

    def replay(self, writer: Any) -> None:
        for method, args, kwargs in self.calls:
            getattr(writer, method)(*args, **kwargs)


def _head(path: Path, arch: str, metadata: _Recorder, entries: list[_Entry]) -> bytes:
    """The header, metadata and tensor table of the file, padded to the data alignment."""
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    try:
        metadata.replay(writer)
        for entry in entries:
            writer.add_tensor_info(entry.name, entry.shape, np.dtype(np.float32), entry.nbytes,
                                   raw_dtype=gguf.GGMLQuantizationType[entry.type])
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
    finally:
        writer.close()
    head = path.read_bytes()
    path.unlink()
    return head + bytes((-len(head)) % GGUF_ALIGNMENT)


def _encode(entry: _Entry, data: torch.Tensor, gguf_type: str, allow_lossy: bool) -> tuple[bytes, str | None]:
    """The bytes of one quantized linear (fused, in its output dtype) in the first candidate type that reproduces
    it exactly, and the problem when none does (with --allow-lossy: llama.cpp's own rounding in the planned type)."""
    import gguf

    order = entry.auto_order
    candidates = [entry.type] if gguf_type != "auto" else list(order[order.index(entry.type):])
    values = None  # the float32 numpy copy that gguf-py's encoders take, made once
    for type_name in candidates:
        if entry.shape[1] % GGUF_BLOCKS[type_name][1]:
            continue
        if type_name == "TQ1_0":  # gguf-py's encoder and decoder (ggml's layout), in numpy
            qtype = gguf.GGMLQuantizationType.TQ1_0
            values = data.to(torch.float32).numpy() if values is None else values
            encoded = gguf.quants.quantize(values, qtype)
            decoded = gguf.quants.dequantize(encoded, qtype).reshape(entry.shape)
            exact = np.array_equal(decoded, values)
        else:
            encoded = encode_block_type(data, type_name)
            exact = reproduces(encoded, type_name, data)
        if exact:
            entry.type = type_name
            return _bytes_view(encoded), None
    if not allow_lossy:
        return None, ("its scales are not fp16 numbers or its blocks hold several scales" if gguf_type == "auto" else
                     "its scales are not fp16 numbers (convert from bfloat16 or float16 weights)")
    qtype = gguf.GGMLQuantizationType[entry.type]
    values = data.to(torch.float32).numpy() if values is None else values
    encoded = gguf.quants.quantize(values, qtype)
    entry.error = float(np.abs(gguf.quants.dequantize(encoded, qtype).reshape(entry.shape) - values).max())
    return _bytes_view(encoded), "not exact"


def export_gguf(source: str | Path, output: str | Path, *, gguf_type: str = "tq2_0", embeddings: str = "f16",
                allow_lossy: bool = False, overwrite: bool = False, quant_type: str | None = None,
                group_size: int | None = None, scheme_file: str | Path | None = None) -> GgufResult:
    """A QAT, fused or packed model folder -> one GGUF file whose quantized linears equal the fused weights."""
    import importlib.util

    if importlib.util.find_spec("gguf") is None:
        raise InputError("--format gguf needs gguf-py, which is not installed", hint="pip install -e '.[gguf]'")

    started = time.perf_counter()
    source, output = Path(source), Path(output)
    _check_options(source, output, gguf_type, embeddings)
    refuse_remote_code(source, hint=NO_REMOTE_CODE_HINT)  # gguf-py's tokenizer readers could prompt for it
    plan = plan_conversion(source, output, quant_type=quant_type, group_size=group_size, scheme_file=scheme_file,
                           fmt="fused", dtype=fused_dtype(embeddings), overwrite=overwrite)
    config = plan.config or {}
    arch = select_architecture(config)
    notes = list(plan.notes) + arch.notes
    entries, extra = _plan_entries(plan, arch, gguf_type, embeddings, allow_lossy)
    metadata = _metadata(source, config, arch, entries, notes)

    guard = OutputGuard(output, [source, scheme_file], overwrite=overwrite, kind="file")
    staging = guard.claim()  # .bitcpm-tmp-<pid>-<name>
    scratch = guard.scratch_path("head")  # gguf-py writes the header here first
    header = partial(_file_header, scratch, arch.name, metadata, entries, embeddings)
    try:
        final, worst, lossy = _write_file(staging, header, entries, extra, plan, arch, gguf_type, allow_lossy)
        _read_back(staging, final, entries)
        guard.commit()
    except BaseException as exc:
        guard.abort(exc)
        raise
    notes += activation_notes(entries, gguf_type)
    return _result(output, gguf_type, arch, entries, time.perf_counter() - started, worst, lossy, notes,
                   list(plan.warnings))


def fused_dtype(embeddings: str) -> str:
    """The dtype of the fused model a GGUF file reproduces bit for bit: float16, whose scales TQ / Q4_0 / Q8_0 blocks
    store as they are (one rounding from the float32 QAT scale, where bfloat16 then float16 would round twice), or
    bfloat16 with `--gguf-embeddings bf16` (its embeddings then bfloat16 bit for bit, its scales bfloat16 numbers)."""
    return "bfloat16" if embeddings == "bf16" else "float16"


def activation_notes(entries: list[_Entry], gguf_type: str) -> list[str]:
    """One note when some quantized linears were trained with activations other than those llama.cpp quantizes
    their written block type's input to (TQ1_0 / TQ2_0: Q8_K, Q4_0 / Q8_0: Q8_0): the file then runs differently
    from training. The file itself records nothing of it (llama.cpp would ignore any such metadata)."""
    differ = [e for e in entries if e.quantized and e.activations != GGUF_ACTIVATIONS[e.type]]
    if not differ:
        return []
    trained = Counter(e.activations for e in differ)
    trained_text = (next(iter(trained)) if len(trained) == 1 else
                    ", ".join(f"{scheme} ({n})" for scheme, n in sorted(trained.items())))
    types = sorted({e.type for e in differ}, key=list(GGUF_BLOCKS).index)
    multiplied = " and ".join(f"{t} blocks by {GGUF_ACTIVATIONS[t].upper()} activations" for t in types)
    if set(trained) == {"q8_0"} and gguf_type != "auto":
        fix = ("export with --gguf-type auto (Q4_0 / Q8_0 blocks, which multiply Q8_0 activations), or train with "
               "activations q8_k, to match")
    else:
        fix = "train with activations q8_k (or q8_0 with --gguf-type auto Q4_0/Q8_0 blocks) to match"
    return [f"activations: {len(differ)} linear(s) were trained with activations {trained_text}, and llama.cpp "
            f"multiplies their {multiplied}: the GGUF runs differently from training; {fix}"]


def _check_options(source: Path, output: Path, gguf_type: str, embeddings: str) -> None:
    """InputError for an unknown --gguf-type or --gguf-embeddings (both named at once), a source that is not a
    folder or an output that is not a .gguf file."""
    problems, hints = [], []
    if gguf_type not in GGUF_TYPES:
        problems.append(f"--gguf-type {gguf_type!r} is not one of {', '.join(GGUF_TYPES)}")
        hints.append("--gguf-type: auto picks the smallest exact type per tensor; tq2_0 is the fastest on CPUs")
    if embeddings not in EMBEDDING_TYPES:
        problems.append(f"--gguf-embeddings {embeddings!r} is not one of {', '.join(EMBEDDING_TYPES)}")
        hints.append("--gguf-embeddings is the type of the embeddings and output layer (never ternary): f16 (the "
                     "default), bf16 (bfloat16 weights bit for bit) or q8_0 (smaller, rounded)")
    if problems:
        raise InputError(problems[0], hint="; ".join(hints), problems=problems if len(problems) > 1 else ())
    if not source.is_dir():
        raise InputError(f"GGUF export needs a model folder with config.json and the tokenizer ({source})",
                         hint="pass the QAT, fused or packed model folder")
    if output.suffix != ".gguf":
        raise InputError(f"--output must name a .gguf file ({output})", hint="e.g. --output model-tq2_0.gguf")


def _plan_entries(plan: Any, arch: Any, gguf_type: str, embeddings: str, allow_lossy: bool
                  ) -> tuple[list[_Entry], list[tuple[str, np.ndarray]]]:
    """Every tensor's GGUF name, shape and type, from the headers and the scheme alone (the checkpoint's tensors in
    the plan's order, then the ones the architecture adds, with their values); CheckFailed naming every linear no
    block type can hold exactly (unless --allow-lossy)."""
    import gguf

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.name.upper()], plan.config["num_hidden_layers"])
    group_sizes = plan.group_sizes()
    entries: list[_Entry] = []
    refused: dict[str, list[str]] = {}
    for name, _, shape in plan.out_specs():
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise InputError(f"no GGUF name for tensor {name} in llama.cpp's {arch.name} architecture",
                             hint="export Llama/MiniCPM-style decoders")
        if name in group_sizes:
            entry = _Entry(name, gguf_name, tuple(shape), "", True, group_sizes[name],
                           activations=plan.activations.get(name.removesuffix(".weight"), "none"))
            entry.type, problem = _plan_type(entry, gguf_type)
            if problem:
                refused.setdefault(problem, []).append(name)
        else:
            kind = "F32" if len(shape) == 1 else embeddings.upper()
            entry = _Entry(name, gguf_name, tuple(shape), kind, False)
        entries.append(entry)
    extra = arch.extra_tensors()
    entries += [_Entry("", n, tuple(v.shape), "F32", False) for n, v in extra]
    if refused and not allow_lossy:
        lines = _grouped(refused)
        hint = ("use --gguf-type auto (Q4_0 / Q8_0 blocks where TQ blocks cannot be exact), or re-fuse with group "
                "size -1 or a multiple of 256" if gguf_type != "auto" else
                "re-fuse with group size -1 or a multiple of 32, or keep these layers in full precision")
        raise CheckFailed(f"cannot export exact {gguf_type.upper()} blocks: {lines[0]}", hint=hint,
                          problems=lines if len(lines) > 1 else ())
    return entries, extra


def _metadata(source: Path, config: dict[str, Any], arch: Any, entries: list[_Entry], notes: list[str]) -> _Recorder:
    """The file's metadata but its file type: name, the architecture's hyperparameters, the tokenizer, the
    quantization version and the size label."""
    import gguf

    metadata = _Recorder()
    metadata.add_name(config.get("_name_or_path") or source.name)
    arch.metadata(metadata)
    write_tokenizer(metadata, source, config["vocab_size"], notes)
    metadata.add_quantization_version(gguf.GGML_QUANT_VERSION)
    total_params = sum(math.prod(e.shape) for e in entries)
    metadata.add_size_label(gguf.size_label(total_params, total_params, 0, 0))
    return metadata


def _file_header(scratch: Path, arch: str, metadata: _Recorder, entries: list[_Entry], embeddings: str) -> bytes:
    """The header with the entries' current types, the file type being the most common quantized one."""
    quantized = [e.type for e in entries if e.quantized]
    main = max(set(quantized), key=quantized.count) if quantized else embeddings.upper()
    final = _Recorder()
    final.calls = metadata.calls + [("add_file_type", (GGUF_FILE_TYPES[main],), {})]
    return _head(scratch, arch, final, entries)


def _write_file(staging: Path, header: Callable[[], bytes], entries: list[_Entry], extra: list[tuple[str, Any]],
                plan: Any, arch: Any, gguf_type: str, allow_lossy: bool) -> tuple[bytes, float, list[str]]:
    """The header with the planned types, every tensor, then the header again with the types written (same
    length); returns the final header, the worst decoding error and the names of the tensors that are not exact."""
    with staging.open("wb") as handle:
        head = header()
        handle.write(head)  # with the planned types; rewritten once the written types are known
        worst, lossy = _write_tensors(handle, entries, dict(extra), plan, arch, gguf_type, allow_lossy)
        final = header()
        if len(final) != len(head):
            raise CheckFailed("the GGUF header changed length after writing", hint="report this as a bug")
        handle.seek(0)
        handle.write(final)
    return final, worst, lossy


def _write_tensors(handle: Any, entries: list[_Entry], extra: dict[str, Any], plan: Any, arch: Any, gguf_type: str,
                   allow_lossy: bool) -> tuple[float, list[str]]:
    """Each entry fused (or taken from the architecture's extra tensors), encoded, checked and written in turn."""
    worst, lossy = 0.0, []
    fused = plan.stream()
    with BackgroundIO() as io:  # fuse and encode here; hash and write the previous tensor meanwhile
        for entry in entries:
            if entry.source:
                raw = _checkpoint_bytes(entry, fused, arch, gguf_type, allow_lossy, lossy)
                worst = max(worst, entry.error)
            else:
                raw = _bytes_view(extra[entry.name])
            if raw.nbytes != entry.nbytes:
                raise CheckFailed(f"{entry.name}: {raw.nbytes} bytes encoded, {entry.nbytes} expected",
                                  hint="report this as a bug; nothing was written")
            io.submit(_write_entry, handle, entry, raw, nbytes=raw.nbytes)
            del raw
    return worst, lossy


def _checkpoint_bytes(entry: _Entry, fused: Any, arch: Any, gguf_type: str, allow_lossy: bool,
                      lossy: list[str]) -> memoryview:
    """The next fused tensor of the checkpoint (which must be `entry`'s), prepared for the architecture and encoded;
    a tensor that is not exact is refused, or (--allow-lossy) added to `lossy`."""
    name, tensor = next(fused)
    if name != entry.source:
        raise CheckFailed(f"GGUF export expected tensor {entry.source}, got {name}",
                          hint="report this as a bug; nothing was written")
    raw, error = _tensor_bytes(entry, arch.prepare(name, tensor), gguf_type, allow_lossy)
    del tensor
    if error:
        if not allow_lossy:
            raise CheckFailed(f"cannot export {name} exactly as {gguf_type.upper()} blocks: {error}",
                              hint="re-fuse from bfloat16 or float16 weights with group size -1 or a multiple of 32; "
                                   "nothing was written")
        lossy.append(name)
    return raw


def _result(output: Path, gguf_type: str, arch: Any, entries: list[_Entry], seconds: float, worst: float,
            lossy: list[str], notes: list[str], warnings: list[str]) -> GgufResult:
    """The report of a written file: its tensor types and sizes, bits per weight, exactness."""
    types: dict[str, int] = {}
    for entry in entries:
        types[entry.type] = types.get(entry.type, 0) + 1
    total_params = sum(math.prod(e.shape) for e in entries)
    linear = [e for e in entries if e.quantized]
    linear_numel = sum(math.prod(e.shape) for e in linear)
    result = GgufResult(
        str(output), gguf_type, len(entries), len(linear), output.stat().st_size, seconds,
        arch.name, types, 8 * sum(e.nbytes for e in entries) / total_params,
        8 * sum(e.nbytes for e in linear) / linear_numel if linear_numel else 0.0, worst, not lossy, notes,
        warnings)
    if lossy:
        result.warnings.append(f"--allow-lossy: {len(lossy)} tensor(s) are not exact; max abs error {worst:g}")
    return result


def _write_entry(handle: Any, entry: _Entry, raw: memoryview) -> None:
    """Record the digest the read-back checks, then write the tensor and its padding."""
    entry.digest = hashlib.sha256(raw).hexdigest()
    handle.write(raw)
    handle.write(bytes((-raw.nbytes) % GGUF_ALIGNMENT))


def _bytes_view(array: Any) -> memoryview:
    """A flat byte view of a contiguous torch tensor or numpy array (written and hashed without a copy)."""
    if isinstance(array, torch.Tensor):
        array = array.contiguous().reshape(-1).view(torch.uint8).numpy()
    return memoryview(np.ascontiguousarray(array).reshape(-1).view(np.uint8))


def _tensor_bytes(entry: _Entry, tensor: torch.Tensor, gguf_type: str, allow_lossy: bool
                  ) -> tuple[memoryview | None, str | None]:
    """The encoded bytes of one checkpoint tensor, and the problem that keeps it from being exact."""
    if entry.quantized:
        return _encode(entry, tensor.contiguous(), gguf_type, allow_lossy)
    if entry.type in ("F32", "F16", "BF16"):
        return _bytes_view(tensor.to({"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[entry.type])), None
    import gguf  # Q8_0 embeddings: llama.cpp's own rounding (a choice the user made, lossy by design)

    return _bytes_view(gguf.quants.quantize(tensor.to(torch.float32).numpy(), gguf.GGMLQuantizationType.Q8_0)), None


def _read_back(path: Path, head: bytes, entries: list[_Entry]) -> None:
    """The written file holds the final header and, at the offsets its tensor table gives (gguf-py's layout: each
    tensor padded to the alignment), exactly the bytes that were checked, read back with plain reads."""
    bad = []
    with path.open("rb") as handle:
        if handle.read(len(head)) != head:
            bad.append("the header")
        for entry in entries:
            if hashlib.sha256(handle.read(entry.nbytes)).hexdigest() != entry.digest:
                bad.append(entry.name)
            handle.seek((-entry.nbytes) % GGUF_ALIGNMENT, os.SEEK_CUR)
        if handle.read(1):
            bad.append("trailing bytes")
    if bad:
        raise CheckFailed(f"the written GGUF does not hold the checked tensors (first: {bad[0]})",
                          hint="report this as a bug; nothing was written")
