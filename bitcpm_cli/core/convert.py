"""`convert`: fuse the quantizer into a checkpoint, pack it to 2 bits a weight, or unpack it, streaming.

One tensor is in memory at a time (safetensors in and out): the output header is laid out from the input headers
before any data is read, then every tensor is read, transformed and written in turn. Everything is written into a
temporary path beside the output and renamed into place at the end, so a failure leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
import time
from contextlib import closing, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from bitcpm_cli import __version__
from bitcpm_cli.core.checkpoint import (
    BackgroundIO,
    SafetensorsStreamWriter,
    TensorReader,
    TensorSpec,
    WeightFiles,
    iter_tensors,
    open_direct,
    prefetched,
    read_config,
    read_json,
    read_tensor_specs,
    safetensors_metadata,
    tensor_byte_ranges,
    tensor_nbytes,
    tensor_order,
)
from bitcpm_cli.core.config_check import require_consistent_config
from bitcpm_cli.core.errors import CheckFailed, ConfigError, InputError, QuantError
from bitcpm_cli.core.formats import (
    PACKED_SHAPES_KEY,
    PACKED_SUFFIX,
    SCALE_SUFFIX,
    PackedPairs,
    packed_base,
    read_packed_shapes,
)
from bitcpm_cli.core.inference_ready import make_inference_ready, read_generation_config
from bitcpm_cli.core.outputs import OutputGuard, check_output
from bitcpm_cli.core.quant import (
    FUSED_GROUP_CANDIDATES,
    LayerQuant,
    QuantScheme,
    fake_quantize,
    fused_scales,
    load_scheme_file,
    pack_ternary,
    plan_state_dict,
    quantize,
    scale_shape,
    ternary_codes_from_fused,
)
from bitcpm_cli.core.quant.scheme import CONFIG_KEY

FORMATS = ("fused", "packed")
DTYPES = ("bfloat16", "float16", "float32")
PROVENANCE_FILE = "bitcpm_convert.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9
# Files of an input directory that are not copied: weights, indexes, its config (rewritten), old provenance.
NOT_COPIED = re.compile(r".*\.(safetensors|bin|pt|pth|ckpt)$|.*\.index\.json$|config\.json(\.bak.*)?$|"
                        + re.escape(PROVENANCE_FILE) + "$")
ProgressFn = Callable[[str, int, int], None]  # (stage, bytes just done, total bytes of the stage)


@dataclass
class VerifyReport:
    tensors_checked: int = 0
    mismatches: list[str] = field(default_factory=list)
    not_ternary: list[str] = field(default_factory=list)
    zero_fraction: dict[str, float] = field(default_factory=dict)  # per quantized tensor

    @property
    def ok(self) -> bool:
        return not self.mismatches and not self.not_ternary

    def per_layer(self) -> dict[str, float]:
        """Zero fraction of the quantized weights of each decoder layer (numel-weighted)."""
        layers: dict[str, list[float]] = {}
        for name, fraction in self.zero_fraction.items():
            match = re.search(r"layers\.(\d+)\.", name)
            layers.setdefault(match.group(1) if match else name, []).append(fraction)
        return {k: sum(v) / len(v) for k, v in sorted(layers.items(), key=lambda kv: (not kv[0].isdigit(),
                                                                                       int(kv[0]) if kv[0].isdigit() else 0, kv[0]))}


@dataclass
class ConvertResult:
    input: str
    output: str
    format: str
    dtype: str
    input_kind: str  # "qat" | "float" | "fused" | "packed"
    scheme: dict[str, Any] | None
    tensors_in: int
    tensors_quantized: int
    bytes_in: int
    bytes_out: int
    quantized_bytes_out: int  # the quantized linears as written (packed codes + scales, or fused tensors)
    quantized_numel: int
    fingerprint: str
    seconds: float
    shards: int
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    verify: VerifyReport | None = None

    @property
    def linear_ratio_vs_bf16(self) -> float:
        """How many times smaller the quantized linears are than the same weights in bf16."""
        return (2 * self.quantized_numel) / self.quantized_bytes_out if self.quantized_bytes_out else 0.0

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k != "verify"}
        out["linear_ratio_vs_bf16"] = round(self.linear_ratio_vs_bf16, 3)
        if self.verify is not None:
            out["verify"] = {"ok": self.verify.ok, "tensors_checked": self.verify.tensors_checked,
                             "mismatches": self.verify.mismatches, "not_ternary": self.verify.not_ternary,
                             "zero_fraction_per_layer": self.verify.per_layer()}
        return out


# ---- options and paths ----------------------------------------------------------------------------
def _resolve_scheme(recorded: QuantScheme | None, quant_type: str | None, group_size: int | None,
                    scheme_file: str | Path | None) -> tuple[QuantScheme | None, list[str]]:
    warnings = []
    base = load_scheme_file(scheme_file) if scheme_file else recorded
    if scheme_file and recorded and base != recorded:
        warnings.append(f"--scheme {scheme_file} differs from the bitcpm_quant recorded in the checkpoint: the "
                        "fused model will not match the QAT model's training forward pass")
    if base is None and quant_type is None and group_size is None:
        return None, warnings
    base = base or QuantScheme(quant_type=quant_type or "ternary", group_size=-1 if group_size is None else group_size)
    if recorded is not None:
        if group_size is not None and group_size != recorded.group_size:
            warnings.append(f"--group-size {group_size} overrides the group size the checkpoint was trained with "
                            f"({recorded.group_size}): the fused model will NOT match its training forward pass")
        if quant_type is not None and quant_type != recorded.quant_type:
            warnings.append(f"--quant-type {quant_type} overrides the checkpoint's {recorded.quant_type}: the fused "
                            "model will NOT match its training forward pass")
    return base.replace(quant_type=quant_type, group_size=group_size), warnings


# ---- the per-tensor transform -------------------------------------------------------------------
class _Transform:
    """Maps input tensors to output tensors; `plan` does the same on specs so the output header is known first."""

    def __init__(self, mode: str, fmt: str, dtype: str, targets: dict[str, LayerQuant],
                 packed_shapes: dict[str, list[int]]):
        self.mode, self.fmt, self.dtype = mode, fmt, getattr(torch, dtype)
        self.dtype_name = dtype
        self.targets, self.packed_shapes = targets, packed_shapes
        self._pending: dict[str, dict[str, Any]] = {}
        self._unpacker = PackedPairs(packed_shapes, self.dtype)

    def _cast_name(self, dtype: str) -> str:
        return self.dtype_name if dtype.startswith(("float", "bfloat")) else dtype

    def plan(self, name: str, spec: TensorSpec) -> list[tuple[str, str, tuple[int, ...]]]:
        if self.mode == "unpack":
            base = packed_base(name)
            if base is None:
                return [(name, self._cast_name(spec.dtype), spec.shape)]
            pending = self._pending.setdefault(base, {})
            pending[name] = spec
            if len(pending) < 2:
                return []
            del self._pending[base]
            return [(base + ".weight", self.dtype_name, tuple(self.packed_shapes[base]))]
        if name not in self.targets:
            return [(name, self._cast_name(spec.dtype), spec.shape)]
        if self.fmt == "fused":
            return [(name, self.dtype_name, spec.shape)]
        base = name.removesuffix(".weight")
        out_features, in_features = spec.shape
        return [(base + PACKED_SUFFIX, "uint8", (out_features, math.ceil(in_features / 4))),
                (base + SCALE_SUFFIX, self.dtype_name, scale_shape(spec.shape, self.targets[name].group_size))]

    def apply(self, name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        if self.mode == "unpack":
            return self._unpacker.add(name, tensor)
        if name not in self.targets:
            return [(name, self._cast(tensor))]
        spec = self.targets[name]
        module = name.removesuffix(".weight")
        if self.mode == "passthrough":
            # Packing needs the planned group size; a fused copy only needs the weight to be fused at all.
            groups = [spec.group_size] + ([] if self.fmt == "packed" else list(FUSED_GROUP_CANDIDATES))
            if not any(fused_scales(tensor, g) is not None for g in groups):
                raise InputError(f"{name} is not fused (its groups hold more than {{-a, 0, +a}}) while the first "
                                 "linear was: the input mixes fused and latent weights",
                                 hint="convert from the QAT checkpoint instead")
            if self.fmt == "fused":
                return [(name, tensor.to(self.dtype))]
            quantized = ternary_codes_from_fused(tensor, spec.group_size)
        else:
            # A latent row never holds just {-a, 0, +a}; checking one row keeps this cheap.
            first_row = -1 if spec.group_size == 0 else spec.group_size
            if spec.quant_type == "ternary" and fused_scales(tensor[:1], first_row) is not None:
                raise InputError(f"{name} is already fused while the first linear was not: the input mixes fused "
                                 "and latent weights", hint="convert from the QAT checkpoint instead")
            if self.fmt == "fused":
                return [(name, fake_quantize(tensor, spec, dtype=self.dtype, name=module, finite=True))]
            quantized = quantize(tensor, spec, name=module, finite=True)
        return [(module + PACKED_SUFFIX, pack_ternary(quantized.codes)),
                (module + SCALE_SUFFIX, quantized.scales.to(self.dtype))]

    def _cast(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(self.dtype) if tensor.is_floating_point() else tensor


# ---- output writing ------------------------------------------------------------------------------
def _shard(specs: list[tuple[str, str, tuple[int, ...]]], max_bytes: int) -> list[list[tuple[str, str, tuple]]]:
    shards: list[list] = [[]]
    size = 0
    for spec in specs:
        nbytes = tensor_nbytes(spec[1], spec[2])
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += nbytes
    return shards


class _ShardedWriter:
    def __init__(self, folder: Path, specs, max_bytes: int, packed_shapes: dict[str, list[int]], single: str | None):
        self.shards = [specs] if single else _shard(specs, max_bytes)
        n = len(self.shards)
        self.names = [single] if single else (["model.safetensors"] if n == 1 else
                                              [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)])
        self.folder, self.packed_shapes = folder, packed_shapes
        # every output tensor's planned (dtype, shape), and (file, offset, length) once its shard is laid out
        self.layout = {spec[0]: (spec[1], tuple(spec[2])) for shard in self.shards for spec in shard}
        self.places: dict[str, tuple[Path, int, int]] = {}
        self._shard_of = {spec[0]: i for i, shard in enumerate(self.shards) for spec in shard}
        self._index = 0
        self._remaining = 0
        self._writer: SafetensorsStreamWriter | None = None
        self.weight_map: dict[str, str] = {}
        self.total_size = 0
        self.metadata: dict[Path, dict[str, str]] = {}  # every shard's header metadata, as planned

    def _open_next(self) -> None:
        shard = self.shards[self._index]
        shapes = {b: self.packed_shapes[b] for b in (packed_base(s[0]) for s in shard) if b in self.packed_shapes}
        metadata = {"format": "pt"}
        if shapes:
            metadata[PACKED_SHAPES_KEY] = json.dumps(shapes, separators=(",", ":"))
        path = self.folder / self.names[self._index]
        self.metadata[path] = metadata
        self._writer = SafetensorsStreamWriter(path, shard, metadata)
        self.places.update({name: (path, *span) for name, span in self._writer.ranges.items()})
        self.total_size += self._writer.nbytes
        self._remaining = len(shard)
        for spec in shard:
            self.weight_map[spec[0]] = self.names[self._index]

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._writer is None:
            self._open_next()
        self._writer.write(name, tensor)
        self._remaining -= 1
        if self._remaining == 0:
            self._writer.close()
            self._writer = None
            self._index += 1

    def flush(self) -> None:
        """Put what the open shard has gathered on the disk, but a partial last block (DirectFile.flush)."""
        if self._writer is not None:
            self._writer.flush()

    def on_disk(self, name: str) -> bool:
        """Whether all of an output tensor's bytes are in its file (asked on the thread that writes)."""
        index = self._shard_of[name]
        if index != self._index or self._writer is None:
            return index < self._index  # a closed shard, or one not begun
        begin, size = self._writer.ranges[name]
        return begin + size <= self._writer.durable

    def abort(self) -> None:
        """Close the shard being written, unfinished (after a failure: the staging folder is removed)."""
        if self._writer is not None:
            self._writer.abort()
            self._writer = None

    def write_index(self) -> None:
        if len(self.names) > 1:
            index = {"metadata": {"total_size": self.total_size}, "weight_map": self.weight_map}
            (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


# ---- the command ---------------------------------------------------------------------------------
@dataclass
class ConversionPlan:
    """What a conversion will do, decided from headers, config.json and (for a dense input) its first linear."""

    files: WeightFiles
    specs: dict[str, TensorSpec]
    config: dict[str, Any] | None
    fmt: str
    dtype: str
    mode: str  # "quantize" | "passthrough" | "unpack"
    input_kind: str
    scheme: QuantScheme | None
    targets: dict[str, LayerQuant]
    packed_shapes: dict[str, list[int]]
    notes: list[str]
    warnings: list[str]

    def transform(self) -> "_Transform":
        return _Transform(self.mode, self.fmt, self.dtype, self.targets, self.packed_shapes)

    def out_specs(self) -> list[tuple[str, str, tuple[int, ...]]]:
        transform = self.transform()
        return [s for name in tensor_order(self.files, self.specs) for s in transform.plan(name, self.specs[name])]

    def unchanged(self, out_specs: list[tuple[str, str, tuple[int, ...]]]) -> frozenset[str]:
        """The safetensors input tensors written as they are (not quantized, same dtype and shape), given
        `out_specs()`."""
        if self.files.format != "safetensors":
            return frozenset()
        return frozenset(name for name, dtype, shape in out_specs
                         if name in self.specs and name not in self.targets
                         and (self.specs[name].dtype, self.specs[name].shape) == (dtype, shape))

    def group_sizes(self) -> dict[str, int]:
        """The scale group size of every quantized linear's weight in the output, by its `.weight` name."""
        if self.mode != "unpack":
            return {name: spec.group_size for name, spec in self.targets.items()}
        sizes = {}
        for base, (out_features, in_features) in self.packed_shapes.items():
            rows, groups = self.specs[base + SCALE_SUFFIX].shape
            sizes[base + ".weight"] = (0 if rows == 1 and out_features > 1 else
                                       -1 if groups == 1 else in_features // groups)
        return sizes

    def stream(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Every output tensor in turn, one input tensor in memory at a time (and what is read ahead)."""
        transform = self.transform()
        with closing(prefetched(iter_tensors(self.files))) as tensors:
            for name, tensor in tensors:
                yield from transform.apply(name, tensor)


def plan_conversion(source: Path, output: Path, *, quant_type: str | None, group_size: int | None,
                    scheme_file: str | Path | None, fmt: str, dtype: str, overwrite: bool) -> ConversionPlan:
    if dtype not in DTYPES:
        raise InputError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}", hint="bfloat16 is what users deploy")
    if quant_type is not None or group_size is not None:
        QuantScheme(quant_type=quant_type or "ternary", group_size=-1 if group_size is None else group_size)
    files, specs = read_tensor_specs(source)
    config = read_config(source) if source.is_dir() else None
    check_output(output, [source, scheme_file], overwrite=overwrite,
                 kind="file" if output.suffix in (".safetensors", ".bin", ".gguf") else "dir")
    if output.name.endswith(".bin") and fmt == "packed":
        raise InputError("the packed format is written as safetensors", hint="name the output *.safetensors or a folder")
    if config is not None:
        require_consistent_config(source)
        read_generation_config(source)  # copied at the end: a broken one is refused before any tensor is read

    notes: list[str] = []
    recorded = QuantScheme.from_config(config) if config else None
    packed_input = any(name.endswith(PACKED_SUFFIX) for name in specs)
    scheme, warnings = _resolve_scheme(None if packed_input else recorded, quant_type, group_size, scheme_file)
    packed_shapes: dict[str, list[int]] = {}
    targets: dict[str, LayerQuant] = {}
    if packed_input:
        if fmt == "packed":
            raise InputError("the input is already packed", hint="use --format fused to unpack it")
        mode, input_kind = "unpack", "packed"
        packed_shapes = read_packed_shapes(files, specs)
        notes.append(f"input is packed: {len(packed_shapes)} linears unpacked to {dtype}")
    else:
        mode, input_kind, targets = _plan_dense(files, specs, scheme, recorded, notes)
        if not targets:
            raise QuantError("no linear weights to quantize in the input",
                             hint="check modules_to_not_convert and the per-layer overrides")
        if fmt == "packed":
            bad = sorted({t.quant_type for t in targets.values()} - {"ternary"})
            if bad:
                raise QuantError(f"the packed format holds ternary codes only, not {', '.join(bad)}",
                                 hint="use --format fused for other quant types")
            packed_shapes = {name.removesuffix(".weight"): list(specs[name].shape) for name in targets}
    return ConversionPlan(files, specs, config, fmt, dtype, mode, input_kind, scheme, targets, packed_shapes, notes,
                          warnings)


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
    started = time.perf_counter()
    source, output = Path(source), Path(output)
    if fmt not in FORMATS:
        raise InputError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}, gguf",
                         hint="fused for transformers / vLLM, packed for 2 bits a weight, gguf for llama.cpp")
    single = output.name if output.suffix in (".safetensors", ".bin") else None
    plan = plan_conversion(source, output, quant_type=quant_type, group_size=group_size, scheme_file=scheme_file,
                           fmt=fmt, dtype=dtype, overwrite=overwrite)
    files, specs, config = plan.files, plan.specs, plan.config
    mode, input_kind, targets, packed_shapes = plan.mode, plan.input_kind, plan.targets, plan.packed_shapes
    scheme, notes, warnings = plan.scheme, plan.notes, plan.warnings
    out_specs = plan.out_specs()
    transform = plan.transform()

    guard = OutputGuard(output, [source, scheme_file], overwrite=overwrite, kind="file" if single else "dir")
    staging = guard.claim()  # .bitcpm-tmp-<pid>-<name>: keeps the suffix, .bin stays .bin
    hasher = hashlib.sha256()
    try:
        folder = staging.parent if single else staging
        if not single:
            staging.mkdir()
        bytes_in = sum(f.stat().st_size for f in files.files)
        tensor_bytes = sum(spec.nbytes for spec in specs.values())  # what the progress bars count to
        # Read and hashed a slice at a time on a thread of its own, while this one quantizes.
        tensors = prefetched(iter_tensors(files, hasher))
        report = None
        if single and single.endswith(".bin"):
            state: dict[str, torch.Tensor] = {}
            checker = _Checker(plan, _InMemory(state), progress, tensor_bytes) if verify else None
            with closing(tensors):
                for name, tensor in tensors:
                    state.update(transform.apply(name, tensor))
                    if checker is not None:
                        checker.check(name, tensor)
                    _tick(progress, "convert", tensor, tensor_bytes)
            torch.save(state, staging)
            if checker is not None:
                report = checker.report
                report.mismatches += _read_back_bin(staging, state)
            del state
            shards, written = 1, [staging]
        else:
            writer = _ShardedWriter(folder, out_specs, max_shard_bytes, packed_shapes,
                                    staging.name if single else None)
            verifier = _Verifier(plan, writer, progress, tensor_bytes) if verify else None
            unchanged = plan.unchanged(out_specs) if verify else frozenset()
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
            shards = len(writer.names)
            written = [folder / n for n in writer.names]
        quantized_shapes = list(packed_shapes.values()) or [specs[n].shape for n in targets]
        quantized_bytes = sum(tensor_nbytes(dt, shape) for name, dt, shape in out_specs
                              if name in targets or packed_base(name) is not None
                              or name.removesuffix(".weight") in packed_shapes)
        result = ConvertResult(
            input=str(source), output=str(output), format=fmt, dtype=dtype, input_kind=input_kind,
            scheme=scheme.to_dict() if scheme and mode != "unpack" else None,
            tensors_in=len(specs), tensors_quantized=len(targets) or len(packed_shapes), bytes_in=bytes_in,
            bytes_out=sum(p.stat().st_size for p in written), quantized_bytes_out=quantized_bytes,
            quantized_numel=sum(math.prod(shape) for shape in quantized_shapes), fingerprint=f"sha256:{hasher.hexdigest()}", seconds=0.0,
            shards=shards, notes=notes, warnings=warnings,
        )
        if not single:
            _write_folder_files(source, staging, config, result, fmt, scheme, targets, mode)
            result.notes += make_inference_ready(staging, source if source.is_dir() else None)
        if report is not None:
            result.verify = report
            if not report.ok:
                bad = result.verify.mismatches + result.verify.not_ternary
                raise CheckFailed(f"verification failed: {len(bad)} tensor(s) differ from the reference "
                                  f"(first: {bad[0]})", hint="report this as a bug; nothing was written",
                                  problems=bad[:20] if len(bad) > 1 else ())
        guard.commit()  # the old output (--overwrite) is removed only once the new one is complete
    except BaseException as exc:
        guard.abort(exc)
        raise
    result.seconds = time.perf_counter() - started
    return result


def _tick(progress: ProgressFn | None, stage: str, tensor: torch.Tensor, total: int) -> None:
    if progress is not None:
        progress(stage, tensor.nbytes, total)


def _plan_dense(files: WeightFiles, specs: dict[str, TensorSpec], scheme: QuantScheme | None,
                recorded: QuantScheme | None, notes: list[str]) -> tuple[str, str, dict[str, LayerQuant]]:
    """Targets and mode for a latent or fused input: the first linear tells whether the input is already fused."""
    shapes = {n: s.shape for n, s in specs.items()}
    dtypes = {n: s.dtype for n, s in specs.items()}
    probe_targets = plan_state_dict(shapes, dtypes, scheme or QuantScheme(group_size=-1))
    if not probe_targets:
        return "quantize", "float", {}
    first = next(n for n in tensor_order(files, specs) if n in probe_targets)
    sample = TensorReader(files, specs)[first]
    candidates = ([scheme.group_size] if scheme else []) + [g for g in FUSED_GROUP_CANDIDATES]
    # One row first: a latent row never holds just {-a, 0, +a}, so a latent input costs a row per candidate.
    fused_at = next((g for g in candidates
                     if fused_scales(sample[:1], g) is not None and fused_scales(sample, g) is not None), None)
    if fused_at is not None:
        # Layers the scheme keeps in full precision stay so; every other linear must be fused too.
        keep_float = {p: o for p, o in (scheme.layers.items() if scheme else ()) if o.get("quant_type") == "none"}
        skip = scheme.modules_to_not_convert if scheme else QuantScheme().modules_to_not_convert
        targets = plan_state_dict(shapes, dtypes, QuantScheme("ternary", fused_at, skip, keep_float))
        notes.append(f"input is already fused (every group of {_describe_group(fused_at)} holds at most "
                     "{-a, 0, +a}): weights are copied through, never re-quantized")
        return "passthrough", "fused", targets
    if scheme is None:
        raise ConfigError(
            "the input records no quantization scheme (no bitcpm_quant in config.json) and none was given",
            hint="pass --quant-type ternary --group-size N with the group size the model was trained with "
                 "(the BitCPM qat-convert.py example uses -1), or --scheme FILE",
        )
    return "quantize", "qat" if recorded else "float", plan_state_dict(shapes, dtypes, scheme)


def _describe_group(group_size: int) -> str:
    return {0: "the whole tensor", -1: "a row"}.get(group_size, f"{group_size} input channels")


def _write_folder_files(source: Path, staging: Path, config: dict | None, result: ConvertResult, fmt: str,
                        scheme: QuantScheme | None, targets: dict[str, LayerQuant], mode: str) -> None:
    if config is not None:
        out_config = {k: v for k, v in config.items() if k != CONFIG_KEY}
        out_config["dtype" if "dtype" in config else "torch_dtype"] = result.dtype
        if fmt == "packed":
            group_sizes = {t.group_size for t in targets.values()}
            packed_scheme = (scheme or QuantScheme()).replace(group_size=next(iter(group_sizes)))
            out_config[CONFIG_KEY] = {**packed_scheme.to_dict(), "packed": True}
        (staging / "config.json").write_text(json.dumps(out_config, indent=2, ensure_ascii=False) + "\n")
    else:
        result.notes.append("the input has no config.json: the output folder holds weights only")
    if source.is_dir():
        for path in sorted(source.iterdir()):
            if path.is_file() and not NOT_COPIED.fullmatch(path.name):
                shutil.copy2(path, staging / path.name)
    provenance = {
        "tool": f"bitcpm {__version__}",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "input": {"path": str(source.resolve()), "fingerprint": result.fingerprint, "kind": result.input_kind},
        "format": fmt, "dtype": result.dtype, "scheme": result.scheme,
        "tensors": {"total": result.tensors_in, "quantized": result.tensors_quantized}, "notes": result.notes,
        "warnings": result.warnings,
    }
    (staging / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n")


def _identical(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bytes (so -0.0 differs from +0.0, and a NaN equals itself)."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(_bits(a), _bits(b))


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    """The bytes of a tensor as integers of its own width (comparing int16 is twice as fast as comparing bytes)."""
    flat = tensor.contiguous().reshape(-1)
    width = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}.get(flat.element_size())
    return flat.view(width) if width is not None and not flat.dtype.is_complex else flat.view(torch.uint8)


def _words(data: torch.Tensor) -> torch.Tensor:
    """Bytes as int64 words where they line up (comparing words is several times faster than comparing bytes)."""
    return data.view(torch.int64) if data.numel() % 8 == 0 and data.storage_offset() % 8 == 0 else data


def _zero_count(tensor: torch.Tensor) -> int:
    """How many values are +0.0 or -0.0 (on the bits: counting floats directly is 8x slower for bf16)."""
    if not tensor.is_floating_point() or tensor.element_size() not in (2, 4):
        return tensor.numel() - int(torch.count_nonzero(tensor))
    return tensor.numel() - int(torch.count_nonzero(_bits(tensor) << 1))  # the sign bit shifted out


def _reference(name: str, tensor: torch.Tensor, targets: dict[str, LayerQuant], mode: str,
               dtype: torch.dtype) -> torch.Tensor:
    if name in targets and mode == "quantize":
        return fake_quantize(tensor, targets[name], dtype=dtype, name=name)
    return tensor.to(dtype) if tensor.is_floating_point() else tensor


class _Checker:
    """`--verify`'s check of each input tensor: what it becomes is recomputed from it (the quantizer run again, a
    packed input unpacked again, a packed output's codes packed again) and compared, bit for bit, with the output
    as `written` gives it."""

    def __init__(self, plan: "ConversionPlan", written: "_ReadBack | _InMemory", progress: ProgressFn | None,
                 total: int):
        self.report = VerifyReport()
        self._plan, self._written, self._progress, self._total = plan, written, progress, total
        self._dtype = getattr(torch, plan.dtype)
        self._unpacker = PackedPairs(plan.packed_shapes, self._dtype)
        self._inputs = {path.name: path for path in plan.files.files}
        self._input_ranges: dict[Path, dict[str, tuple[int, int]]] = {}

    def check(self, name: str, tensor: torch.Tensor | None) -> None:
        """`tensor` None: one written unchanged, not held meanwhile; compared with its bytes in the input file."""
        plan, report = self._plan, self.report
        if self._progress is not None:
            self._progress("verify", plan.specs[name].nbytes, self._total)
        if tensor is None:
            report.tensors_checked += 1
            source = self._inputs[plan.specs[name].file]
            if source not in self._input_ranges:
                self._input_ranges[source] = tensor_byte_ranges(source)
            if not self._written.same_as_file(name, source, self._input_ranges[source][name][0]):
                report.mismatches.append(name)
            return
        if plan.mode == "unpack":
            fused = self._unpacker.add(name, tensor)
            if not fused:
                return
            ((name, tensor),) = fused
        base = name.removesuffix(".weight")
        if plan.fmt == "packed" and name in plan.targets:
            # The codes and scales the quantizer (or the fused input) gives again, packed again, byte for byte:
            # the padding codes of a row and the scale of a group of zero codes too (unpacking would hide both).
            spec = plan.targets[name]
            expected = (quantize(tensor, spec, name=base) if plan.mode == "quantize"
                        else ternary_codes_from_fused(tensor, spec.group_size))
            codes_same = self._written.same(base + PACKED_SUFFIX, pack_ternary(expected.codes))
            report.tensors_checked += 1
            if not (self._written.same(base + SCALE_SUFFIX, expected.scales.to(self._dtype)) and codes_same):
                report.mismatches.append(name)
            report.zero_fraction[name] = _zero_count(expected.codes) / max(expected.codes.numel(), 1)
            return
        reference = _reference(name, tensor, plan.targets, plan.mode, self._dtype)
        identical = self._written.same(name, reference)
        written = reference if identical else self._written.reread(name)
        report.tensors_checked += 1
        if not identical:
            report.mismatches.append(name)
        if name in plan.targets or base in plan.packed_shapes:
            report.zero_fraction[name] = _zero_count(written) / max(written.numel(), 1)
            spec = plan.targets.get(name, LayerQuant("ternary", -1))
            # A tensor identical to its reference holds {-a, 0, +a} per group by construction (the quantizer's
            # output, unpacked codes, or a fused input checked while converting); any other is checked here.
            groups = [spec.group_size] if plan.mode == "quantize" else FUSED_GROUP_CANDIDATES
            if (spec.quant_type == "ternary" and not identical
                    and not any(fused_scales(written, g) is not None for g in groups)):
                report.not_ternary.append(name)


class _InMemory:
    """The output of a `.bin` conversion, all in memory until torch.save writes it (and `_read_back_bin` reads it
    back)."""

    def __init__(self, state: dict[str, torch.Tensor]):
        self._state = state

    def reread(self, name: str) -> torch.Tensor:
        return self._state[name]

    def same(self, name: str, reference: torch.Tensor) -> bool:
        return _identical(self._state[name], reference)


def _read_back_bin(path: Path, state: dict[str, torch.Tensor]) -> list[str]:
    """The tensors that differ between what torch.save wrote and `state` (or are missing on either side)."""
    files, _ = read_tensor_specs(path)
    found = dict(iter_tensors(files))
    return sorted(name for name in found.keys() | state.keys()
                  if name not in found or name not in state or not _identical(found[name], state[name]))


class _ReadBack:
    """The output's bytes, read back from the disk with direct I/O while the conversion still writes the file.

    `_Verifier` asks for a tensor only once all its bytes are there (`request`); a reading thread of its own
    (`prefetched`) reads what was asked for, in order, a slice at a time (a read stops at the tensor's end), while
    the checking thread recomputes the reference: `same` and `same_as_file` compare the next tensor slice by
    slice. The slices are a few buffers used in turn (a fresh buffer each time is fresh memory the kernel must
    zero: a second of system time at 1B)."""

    SLICE = 8 * 2**20
    AHEAD = 2  # slices read ahead

    def __init__(self, writer: _ShardedWriter):
        import queue

        self._writer = writer
        self._requests: queue.SimpleQueue = queue.SimpleQueue()  # lists of output names; None: no more
        self._buffers = [torch.empty(self.SLICE, dtype=torch.uint8) for _ in range(self.AHEAD + 2)]
        self._free: queue.SimpleQueue = queue.SimpleQueue()  # buffers not in use, by index; None: stop reading
        for index in range(len(self._buffers)):
            self._free.put(index)
        self._stream = prefetched(self._read(), max_bytes=self.AHEAD * self.SLICE, name="bitcpm-read-back")
        self._expected = torch.empty(self.SLICE, dtype=torch.uint8)  # input bytes, for `same_as_file`

    def request(self, names: list[str]) -> None:
        self._requests.put(names)

    def _spans(self, name: str) -> range:
        size = self._writer.places[name][2]
        return range(0, max(size, 1), self.SLICE)  # an empty tensor is one empty slice

    def _read(self) -> Iterator[tuple[str, torch.Tensor]]:
        readers: dict[Path, Any] = {}  # the shard being read: the output is read in order, shard after shard
        try:
            for names in iter(self._requests.get, None):
                for name in names:
                    path, begin, size = self._writer.places[name]
                    if path not in readers:
                        for reader in readers.values():  # an earlier shard: done (its fd and window go now)
                            reader.close()
                        readers = {path: open_direct(path)}
                    readers[path].seek(begin)
                    for offset in self._spans(name):
                        index = self._free.get()
                        if index is None:
                            return
                        part = self._buffers[index][:min(self.SLICE, size - offset)]
                        if readers[path].readinto(memoryview(part.numpy())) != part.numel():
                            raise CheckFailed(f"the written output ends inside {name}, short of what its own header "
                                              "says", hint="report this as a bug; nothing was written")
                        yield (name, index), part
        finally:
            for reader in readers.values():
                reader.close()

    def _slices(self, name: str) -> Iterator[torch.Tensor]:
        """The next tensor's slices; each buffer goes back for reading once the caller asks for the next."""
        for _ in self._spans(name):
            (got, index), part = next(self._stream)
            if got != name:
                raise CheckFailed(f"read back {got} where {name} was expected", hint="report this as a bug; nothing "
                                                                                     "was written")
            try:
                yield part
            finally:
                self._free.put(index)

    def same(self, name: str, reference: torch.Tensor) -> bool:
        dtype, shape = self._writer.layout[name]
        expected = reference.contiguous().reshape(-1).view(torch.uint8)
        return (self._matches(name, lambda offset, size: expected[offset:offset + size])
                and (str(reference.dtype), tuple(reference.shape)) == (f"torch.{dtype}", shape))

    def same_as_file(self, name: str, path: Path, begin: int) -> bool:
        """Whether the next tensor's bytes equal those at `begin` in `path` (a tensor written unchanged)."""
        with path.open("rb") as handle:
            handle.seek(begin)

            def expected(offset: int, size: int) -> torch.Tensor:
                part = self._expected[:size]
                return part[:handle.readinto(memoryview(part.numpy()))]

            return self._matches(name, expected)

    def _matches(self, name: str, expected: Callable[[int, int], torch.Tensor]) -> bool:
        same, offset = True, 0
        for part in self._slices(name):  # every slice is taken, so the next tensor starts with its own
            same = same and torch.equal(_words(part), _words(expected(offset, part.numel())))
            offset += part.numel()
        return same

    def reread(self, name: str) -> torch.Tensor:
        """A tensor read from the file again (to say what differs)."""
        path, begin, size = self._writer.places[name]
        data = torch.empty(size, dtype=torch.uint8)
        with path.open("rb") as handle:
            handle.seek(begin)
            handle.readinto(memoryview(data.numpy()))
        dtype, shape = self._writer.layout[name]
        return data.view(getattr(torch, dtype)).reshape(shape)

    def close(self) -> None:
        self._requests.put(None)  # a reading thread waiting for a request or a buffer ends
        self._free.put(None)
        self._stream.close()


class _Verifier:
    """`--verify` alongside the conversion. Each input tensor, once the writer has put all that it became in the
    file, goes to a thread of its own (`bitcpm-verify`) that checks it (`_Checker`) against the bytes read back
    from the disk (`_ReadBack`). The check never waits for the writer; the writer waits for the check only while
    its queue is full. At the end the written headers are read back and must give the planned layout."""

    def __init__(self, plan: "ConversionPlan", writer: _ShardedWriter, progress: ProgressFn | None, total: int):
        from collections import deque

        self._writer, self._read_back = writer, _ReadBack(writer)
        self._checker = _Checker(plan, self._read_back, progress, total)
        self._waiting: deque = deque()  # (input name, tensor, output names) in input order
        self._queue = BackgroundIO(max_pending_bytes=32 * 2**20, name="bitcpm-verify")

    WAITING = 32 * 2**20  # input bytes held for outputs not yet on the disk, at most (plus one tensor)

    def written(self, name: str, tensor: torch.Tensor | None, outputs: list[str]) -> None:
        """On the writing thread, once `outputs` (what `name` became) are written."""
        self._waiting.append((name, tensor, outputs))
        self._release()
        if sum(0 if held is None else held.nbytes for _, held, _ in self._waiting) > self.WAITING:
            # Small outputs (2 bits a weight) fill the writer's window slowly: put them on the disk now.
            self._writer.flush()
            self._release()

    def _release(self) -> None:
        while self._waiting and all(self._writer.on_disk(out) for out in self._waiting[0][2]):
            name, tensor, outputs = self._waiting.popleft()
            self._read_back.request(outputs)
            self._queue.submit(self._checker.check, name, tensor, nbytes=0 if tensor is None else tensor.nbytes)

    def finish(self, staging: Path) -> VerifyReport:
        """The report, once everything is written (every shard closed): the last tensors checked, then the
        layout read back from the written headers (and index) compared with the planned one."""
        self._release()
        if self._waiting:
            raise CheckFailed(f"{len(self._waiting)} tensor(s) never reached the disk",
                              hint="report this as a bug; nothing was written")
        self._queue.drain()
        report = self._checker.report
        out_files, out_specs = read_tensor_specs(staging)
        found = {name: (path, *span) for path in out_files.files for name, span in tensor_byte_ranges(path).items()}
        index = read_json(out_files.index, "weight index") if out_files.index else {}
        weight_map = index.get("weight_map", {})
        planned, layout = self._writer.places, self._writer.layout
        report.mismatches += sorted(
            name for name in planned.keys() | found.keys() | weight_map.keys()
            if name not in planned or name not in found or found[name] != planned[name]
            or (out_specs[name].dtype, out_specs[name].shape) != layout[name]
            or (out_files.index is not None and weight_map.get(name) != planned[name][0].name))
        # The header metadata (the packed linears' shapes) and the index's total size are read back too.
        report.mismatches += sorted(f"{path.name} (metadata)" for path in out_files.files
                                    if safetensors_metadata(path) != self._writer.metadata.get(path))
        if out_files.index is not None and index.get("metadata", {}).get("total_size") != self._writer.total_size:
            report.mismatches.append(f"{out_files.index.name} (total_size)")
        return report

    def __enter__(self) -> "_Verifier":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self._queue.__exit__(exc_type, exc, tb)  # after a failure, what is queued is not run
        finally:
            self._read_back.close()
