"""What a conversion will do, decided from headers, config.json and (for a dense input) its first linear, before any
weight is read: the mode (quantize, pass a fused input through, unpack a packed one), the targets and their scheme,
the per-tensor transform, and every output tensor's name, dtype and shape.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from bitcpm_cli.core.errors import ConfigError, InputError, QuantError, collect
from bitcpm_cli.core.formats.packed import PACKED_SUFFIX, SCALE_SUFFIX, PackedPairs, packed_base, read_packed_shapes
from bitcpm_cli.core.io.background import prefetched
from bitcpm_cli.core.io.outputs import check_output
from bitcpm_cli.core.model.checkpoint import (
    TensorReader,
    TensorSpec,
    WeightFiles,
    iter_tensors,
    read_config,
    read_tensor_specs,
    tensor_order,
)
from bitcpm_cli.core.model.config_check import require_consistent_config
from bitcpm_cli.core.model.hf import DTYPES
from bitcpm_cli.core.model.inference_ready import read_generation_config
from bitcpm_cli.core.model.learned_scales import (
    expected_scales,
    is_scale_name,
    read_scales,
    require_scales_fit,
    weight_name,
)
from bitcpm_cli.core.quant.activations import FUSED_CONFIG_KEY, block_problem, read_fused_record
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

# The checkpoint layouts a conversion plans (and convert_checkpoint writes), with what each is for. The formats of
# `convert --format`, these and gguf, are the table in formats.py.
CHECKPOINT_FORMATS = {"fused": "transformers / vLLM", "packed": "2 bits a weight"}


ProgressFn = Callable[[str, int, int], None]  # (stage, bytes just done, total bytes of the stage)


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
    if recorded is not None and (problems := recorded.learned_override_problems(quant_type, group_size)):
        raise InputError(problems[0], hint=f"omit --quant-type and --group-size (or pass {recorded.quant_type} and "
                                           f"{recorded.group_size}): the learned scales are used as trained")
    if recorded is not None:
        if group_size is not None and group_size != recorded.group_size:
            warnings.append(f"--group-size {group_size} overrides the group size the checkpoint was trained with "
                            f"({recorded.group_size}): the fused model will NOT match its training forward pass")
        if quant_type is not None and quant_type != recorded.quant_type:
            warnings.append(f"--quant-type {quant_type} overrides the checkpoint's {recorded.quant_type}: the fused "
                            "model will NOT match its training forward pass")
    return base.replace(quant_type=quant_type, group_size=group_size), warnings


# ---- the per-tensor transform -------------------------------------------------------------------
class Transform:
    """Maps input tensors to output tensors; `plan` does the same on specs so the output header is known first."""

    def __init__(self, mode: str, fmt: str, dtype: str, targets: dict[str, LayerQuant],
                 packed_shapes: dict[str, list[int]], scales: dict[str, torch.Tensor] | None = None):
        self.mode, self.fmt, self.dtype = mode, fmt, getattr(torch, dtype)
        self.dtype_name = dtype
        self.targets, self.packed_shapes = targets, packed_shapes
        # learned scales (float32 [rows, groups]) by the `.weight` they quantize; their own tensors are consumed
        self.scales = scales or {}
        self._pending: dict[str, dict[str, Any]] = {}
        self._unpacker = PackedPairs(packed_shapes, self.dtype)

    def _cast_name(self, dtype: str) -> str:
        return self.dtype_name if dtype.startswith(("float", "bfloat")) else dtype

    def plan(self, name: str, spec: TensorSpec) -> list[tuple[str, str, tuple[int, ...]]]:
        if self.consumes(name):
            return []
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

    def consumes(self, name: str) -> bool:
        """Whether an input tensor is a learned scale, used by the quantizer and not written itself."""
        return is_scale_name(name) and weight_name(name) in self.scales

    def apply(self, name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """The output tensors one input tensor becomes (none for a consumed scale or the first of a packed pair)."""
        if self.dtype == torch.float16 and self.mode == "unpack" and name.endswith(SCALE_SUFFIX):
            # a packed pair's weight is built when its second tensor arrives, which may be the uint8 codes
            _require_float16_range(name, tensor.to(self.dtype), tensor)
        outputs = self._outputs(name, tensor)
        if self.dtype == torch.float16:
            for out_name, out in outputs:
                _require_float16_range(out_name, out, tensor)
        return outputs

    def _outputs(self, name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        if self.consumes(name):
            return []
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
            # A latent row never holds just {-a, 0, +a}; checking one row keeps this cheap. (Learned scales quantize
            # any latent weight exactly as the QAT forward does: nothing to check.)
            first_row = -1 if spec.group_size == 0 else spec.group_size
            if spec.quant_type == "ternary" and not spec.learned and fused_scales(tensor[:1], first_row) is not None:
                raise InputError(f"{name} is already fused while the first linear was not: the input mixes fused "
                                 "and latent weights", hint="convert from the QAT checkpoint instead")
            scales = self.scales.get(name)
            if self.fmt == "fused":
                return [(name, fake_quantize(tensor, spec, dtype=self.dtype, name=module, finite=True, scales=scales))]
            quantized = quantize(tensor, spec, name=module, finite=True, scales=scales)
        return [(module + PACKED_SUFFIX, pack_ternary(quantized.codes)),
                (module + SCALE_SUFFIX, quantized.scales.to(self.dtype))]

    def _cast(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(self.dtype) if tensor.is_floating_point() else tensor


def _require_float16_range(name: str, out: torch.Tensor, source: torch.Tensor) -> None:
    """A float16 output may not turn finite input values into infinities (float16 ends at 65504): refused, naming the
    tensor and its largest value, rather than written as inf."""
    if (not out.is_floating_point() or torch.isfinite(out).all()
            or not (source.is_floating_point() and torch.isfinite(source).all())):
        return
    largest = float(source.detach().abs().max())
    raise InputError(f"{name} has values beyond float16's range (largest {largest:.6g}, float16 ends at 65504)",
                     hint="convert with --dtype bfloat16 (for GGUF: --gguf-embeddings bf16); nothing was written")


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
    scales: dict[str, torch.Tensor] = field(default_factory=dict)  # learned scales, by the `.weight` they quantize
    # How each quantized linear's input is quantized, {module name: scheme}, the full-precision ones left out: from
    # the scheme's targets, a fused input's `bitcpm_activations` record or a packed input's bitcpm_quant.
    activations: dict[str, str] = field(default_factory=dict)

    def transform(self) -> "Transform":
        return Transform(self.mode, self.fmt, self.dtype, self.targets, self.packed_shapes, self.scales)

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
    if fmt not in CHECKPOINT_FORMATS:
        raise InputError(f"--format {fmt!r} is not one of {', '.join(CHECKPOINT_FORMATS)}",
                         hint=", ".join(f"{name} for {purpose}" for name, purpose in CHECKPOINT_FORMATS.items())
                         + "; export_gguf writes GGUF for llama.cpp")
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
    # A fused input's activation record is checked against the headers before any weight is read.
    record = (read_fused_record(config[FUSED_CONFIG_KEY], {n: s.shape for n, s in specs.items()},
                                f"{source / 'config.json'}") if config and FUSED_CONFIG_KEY in config else None)
    packed_input = any(name.endswith(PACKED_SUFFIX) for name in specs)
    scheme, warnings = _resolve_scheme(None if packed_input else recorded, quant_type, group_size, scheme_file)
    if scheme_file is not None and scheme is not None:
        notes += scheme.notes  # what the scheme file could not carry exactly (a CANN file's calibrated scales)
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
    activations = _plan_activations(mode, targets, packed_shapes, recorded, scheme, record, warnings)
    scales = _learned_scales(source, files, specs, targets if mode == "quantize" else {}, scheme_file, notes)
    return ConversionPlan(files, specs, config, fmt, dtype, mode, input_kind, scheme, targets, packed_shapes, notes,
                          warnings, scales, activations)


def _plan_activations(mode: str, targets: dict[str, LayerQuant], packed_shapes: dict[str, list[int]],
                      recorded: QuantScheme | None, scheme: QuantScheme | None, record: dict[str, str] | None,
                      warnings: list[str]) -> dict[str, str]:
    """{module: activation scheme} of the quantized linears (none left out): the scheme's for a quantized input, the
    packed scheme's for a packed one (checked against the recorded shapes), the record's for a fused one. A record
    or scheme that the output does not follow is a warning."""
    if mode == "quantize":
        activations = {n.removesuffix(".weight"): t.activations for n, t in targets.items() if t.activations != "none"}
        if record is not None and record != activations:
            warnings.append(f"the input's {FUSED_CONFIG_KEY} record is replaced by the activations of the "
                            f"quantization scheme ({(scheme or QuantScheme()).activation_summary()})")
        return activations
    if mode == "unpack":
        own = recorded or QuantScheme()
        activations = {base: own.for_module(base).activations for base in packed_shapes
                       if own.for_module(base).activations != "none"}
        problems = [p for base, a in activations.items()
                    if (p := block_problem(a, packed_shapes[base][1], base)) is not None]
        collect(problems, ConfigError, "the packed checkpoint's bitcpm_quant activations do not fit its layers",
                "the packed checkpoint was not written by bitcpm or is damaged")
        return activations
    # Passthrough: a fused input's record says what its weights were trained with; without one, the scheme does (a
    # QAT checkpoint whose weights are already fused, --scheme), whose blocks plan_state_dict has checked.
    modules = [n.removesuffix(".weight") for n in targets]
    if record is None:
        return {m: a for m in modules if (a := scheme.for_module(m).activations) != "none"} if scheme else {}
    outside = sorted(set(record) - set(modules))
    if outside:  # e.g. an lm_head the QAT model quantized: the passthrough keeps it as it is, in full precision
        warnings.append(f"activations: {len(outside)} linear(s) of the fused input's {FUSED_CONFIG_KEY} record are "
                        f"not quantized linears of this conversion ({', '.join(outside[:3])}): a fused output keeps "
                        "their record, a packed output and a GGUF run them with full-precision activations; convert "
                        "the QAT checkpoint instead")
    differ = [m for m in modules if scheme is not None and scheme.for_module(m).activations != record.get(m, "none")]
    if differ:
        warnings.append(f"activations: the scheme given quantizes the input of {len(differ)} linear(s) differently "
                        f"from the fused input's {FUSED_CONFIG_KEY} record, which is kept: the record says what the "
                        "weights were trained with")
    return dict(record)


def packed_scheme_recording(scheme: QuantScheme, targets: dict[str, LayerQuant],
                            activations: dict[str, str]) -> QuantScheme:
    """`scheme` as a packed config's bitcpm_quant that resolves every target to its activation scheme: unchanged
    when it already does (a QAT input's own scheme), else with exact-name overrides for the linears it gets wrong
    (a fused input's record)."""
    modules = {n.removesuffix(".weight"): t for n, t in targets.items()}

    def wrong_in(candidate: QuantScheme) -> dict[str, LayerQuant]:
        return {m: t for m, t in modules.items() if candidate.for_module(m).activations != activations.get(m, "none")}

    if not (wrong := wrong_in(scheme)):
        return scheme
    scheme = scheme.with_activations(Counter(activations.get(m, "none") for m in modules).most_common(1)[0][0])
    wrong = wrong_in(scheme)
    overrides = {re.escape(m): {"quant_type": t.quant_type, "group_size": t.group_size,
                                "activations": activations.get(m, "none")} for m, t in wrong.items()}
    return scheme.replace(layers={**overrides, **scheme.layers})


def _learned_scales(source: Path, files: WeightFiles, specs: dict[str, TensorSpec], targets: dict[str, LayerQuant],
                    scheme_file: str | Path | None, notes: list[str]) -> dict[str, torch.Tensor]:
    """The learned scales the quantized targets use, by `.weight` name, read once the headers say they fit (every
    target of a learned-scales scheme has one of its shape, and no other is stored); InputError otherwise."""
    expected = expected_scales(specs, targets)
    hint = ("the --scheme file must be the checkpoint's own scheme (learned_scales: true and the group size the "
            "scales were trained with); omit --scheme to use config.json's" if scheme_file else None)
    require_scales_fit(specs, expected, source, hint=hint)
    if not expected:
        return {}
    scales = read_scales(source, sorted(expected), files, specs)
    notes.append(f"learned scales: {len(scales)} linears quantized with their trained scales (quant_alpha), which "
                 "are not written to the output")
    return {weight_name(name): tensor for name, tensor in scales.items()}


def _plan_dense(files: WeightFiles, specs: dict[str, TensorSpec], scheme: QuantScheme | None,
                recorded: QuantScheme | None, notes: list[str]) -> tuple[str, str, dict[str, LayerQuant]]:
    """Targets and mode for a latent or fused input: the first linear tells whether the input is already fused."""
    shapes = {n: s.shape for n, s in specs.items()}
    dtypes = {n: s.dtype for n, s in specs.items()}
    if scheme is not None and scheme.learned_scales:
        # Learned scales: the codes come from the trained scales, never from the weight's own {-a, 0, +a}.
        return "quantize", "qat" if recorded else "float", plan_state_dict(shapes, dtypes, scheme)
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
