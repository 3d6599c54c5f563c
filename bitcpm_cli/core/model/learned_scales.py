"""Learned scales (`<module>.quant_alpha`, float32 [rows, groups]) of a QAT checkpoint trained with
`learned_scales: true`: which tensors hold them, whether they fit the scheme (from the tensor headers alone), and
loading them into a prepared model.

transformers' `from_pretrained` drops `*.quant_alpha` as unexpected keys, so every loader of a QAT checkpoint calls
`load_learned_scales` right after `prepare`: every stored scale is copied into its QATLinear, exactly, and a scale
that is missing, of the wrong shape, not finite, or stored for a scheme without learned scales is an InputError
naming the tensor (never a silent drop, never a silent fall back to absmean).
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from bitcpm_cli.core.errors import InputError
from bitcpm_cli.core.model.checkpoint import TensorReader, TensorSpec, read_tensor_specs

if TYPE_CHECKING:
    from bitcpm_cli.core.quant import LayerQuant

# quant's SCALE_PARAM as a tensor-name suffix, spelled here so that reading headers (fix-config, the engines'
# import) does not import torch, which importing quant does; tests/unit/test_learned_scales_loading.py holds them
# equal.
SCALE_PARAM_NAME = "quant_alpha"
SCALE_SUFFIX = "." + SCALE_PARAM_NAME


@dataclass(frozen=True)
class ScaleSlot:
    """Where a learned scale goes: its shape [rows, groups], and the weight and group size that decide it."""

    shape: tuple[int, int]
    weight_shape: tuple[int, ...]
    group_size: int


def is_scale_name(name: str) -> bool:
    """Whether a checkpoint tensor is a learned scale (`<module>.quant_alpha`)."""
    return name.endswith(SCALE_SUFFIX)


def scale_name(weight_name: str) -> str:
    """`<module>.quant_alpha` of `<module>.weight` (or of the module name itself)."""
    return weight_name.removesuffix(".weight") + SCALE_SUFFIX


def weight_name(name: str) -> str:
    """`<module>.weight` of `<module>.quant_alpha`."""
    return name.removesuffix(SCALE_SUFFIX) + ".weight"


def stored_scale_names(specs: dict[str, TensorSpec]) -> list[str]:
    """The learned scales a checkpoint holds, by tensor name (from its headers)."""
    return sorted(name for name in specs if is_scale_name(name))


def expected_scales(specs: dict[str, TensorSpec], targets: dict[str, "LayerQuant"]) -> dict[str, ScaleSlot]:
    """The learned scale each learned-scales target (`<module>.weight` -> its LayerQuant) needs, by tensor name."""
    from bitcpm_cli.core.quant import scale_shape

    return {scale_name(name): ScaleSlot(scale_shape(specs[name].shape, spec.group_size), tuple(specs[name].shape),
                                        spec.group_size)
            for name, spec in targets.items() if spec.learned}


def _fitting_group_size(stored: tuple[int, ...], weight: tuple[int, ...]) -> int | None:
    """The group size a stored scale's shape fits for this weight, if any."""
    from bitcpm_cli.core.quant import scale_shape

    if len(stored) != 2 or len(weight) != 2:
        return None
    for group_size in (0, -1) + tuple(d for d in range(1, weight[1]) if weight[1] % d == 0):
        if scale_shape(weight, group_size) == tuple(stored):
            return group_size
    return None


def _shape_problem(name: str, spec: TensorSpec, slot: ScaleSlot) -> str | None:
    if not spec.dtype.startswith(("float", "bfloat")):
        return f"{name}: stored as {spec.dtype}, a learned scale is a floating tensor"
    if tuple(spec.shape) == slot.shape:
        return None
    fits = _fitting_group_size(spec.shape, slot.weight_shape)
    return (f"{name}: shape {list(spec.shape)} does not fit its weight {list(slot.weight_shape)} at group_size "
            f"{slot.group_size} (that needs {list(slot.shape)})"
            + (f"; it fits group_size {fits}" if fits is not None else ""))


def scale_problems(specs: dict[str, TensorSpec], expected: dict[str, ScaleSlot],
                   allow_missing: bool = False) -> list[str]:
    """Every way the checkpoint's learned scales (`specs`, headers) disagree with those the scheme needs
    (`expected`): stored ones for a scheme without learned scales or for a layer it does not quantize, missing ones
    (unless `allow_missing`), wrong shapes or dtypes. Empty when they agree."""
    stored = stored_scale_names(specs)
    if stored and not expected:
        return [f"{stored[0]}: the checkpoint holds {len(stored)} learned scale tensor(s) ({SCALE_PARAM_NAME}) but its "
                "quantization scheme has no learned_scales"]
    problems = [] if allow_missing else [f"{name}: missing (the scheme has learned_scales)"
                                         for name in sorted(set(expected) - set(stored))]
    for name in stored:
        if name not in expected:
            problems.append(f"{name}: a learned scale for a layer the scheme does not quantize")
        elif problem := _shape_problem(name, specs[name], expected[name]):
            problems.append(problem)
    return problems


def scale_hint(problem: str) -> str:
    """How to fix the kind of problem `scale_problems` reported first."""
    if "has no learned_scales" in problem:
        return ("if the model was trained with learned scales, add \"learned_scales\": true to bitcpm_quant in "
                "config.json; otherwise remove the quant_alpha tensors (bitcpm never drops them silently)")
    if "missing" in problem:
        return ("the checkpoint is incomplete: save it again from training (final/ or a checkpoint-N/ folder), "
                "or remove learned_scales from bitcpm_quant to quantize with absmean scales instead")
    return ("bitcpm_quant (group_size, modules_to_not_convert, layers) must be the scheme the scales were trained "
            "with; restore config.json from the training output")


def require_scales_fit(specs: dict[str, TensorSpec], expected: dict[str, ScaleSlot], where: str | Path,
                       allow_missing: bool = False, hint: str | None = None) -> None:
    """InputError naming `where` and every learned scale that disagrees with the scheme (`scale_problems`)."""
    problems = scale_problems(specs, expected, allow_missing)
    if problems:
        head = problems[0] if len(problems) == 1 else f"{len(problems)} learned scales do not fit: {problems[0]}"
        raise InputError(f"{head} ({where})", hint=hint or scale_hint(problems[0]),
                         problems=problems if len(problems) > 1 else ())


def read_scales(source: str | Path, names: list[str], files: Any = None,
                specs: dict[str, TensorSpec] | None = None) -> dict[str, Any]:
    """The named learned scales, read through the checkpoint's readers (safetensors, or a memory-mapped
    weights_only .bin; shards confined to the folder), as float32 (exact for any float dtype they were stored in);
    InputError naming a tensor that holds NaN or infinity."""
    import torch

    if files is None or specs is None:
        files, specs = read_tensor_specs(source)
    reader = TensorReader(files, specs)
    scales = {}
    for name in names:
        tensor = reader[name].to(torch.float32)
        if not bool(torch.isfinite(tensor).all()):
            raise InputError(f"{name}: the learned scale holds NaN or infinite values ({source})",
                             hint="the checkpoint is damaged or training diverged: use an earlier checkpoint")
        scales[name] = tensor
    return scales


def load_learned_scales(model: Any, model_dir: str | Path, allow_missing: bool = False) -> int:
    """Copy every learned scale stored in `model_dir` into the prepared `model`'s QATLinears; returns how many.

    InputError (nothing copied) for a learned-scales scheme whose checkpoint lacks a scale (unless `allow_missing`:
    a training run that turns learned scales on keeps the absmean initial value of those), a stored scale whose
    shape does not fit its layer, one that is not finite, or `*.quant_alpha` tensors in a checkpoint whose scheme
    has no learned scales."""
    import torch

    from bitcpm_cli.core.quant import learned_scale_params

    layers = learned_scale_params(model)
    files, specs = read_tensor_specs(model_dir)
    expected = {name: ScaleSlot(tuple(layer.quant_alpha.shape), tuple(layer.weight.shape), layer.quant.group_size)
                for name, layer in layers.items()}
    require_scales_fit(specs, expected, model_dir, allow_missing)
    scales = read_scales(model_dir, [name for name in layers if name in specs], files, specs)
    with torch.no_grad():
        for name, tensor in scales.items():
            alpha = layers[name].quant_alpha
            alpha.copy_(tensor.to(device=alpha.device, dtype=alpha.dtype))  # a new version: no stale fused cache
    return len(scales)


class _ScaleReportFilter(logging.Filter):
    """Drops transformers' load report when all it reports is learned scales as unexpected keys (they are loaded
    next, by `load_learned_scales`); a report that names anything else is kept whole."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "LOAD REPORT" not in message:
            return True
        rows = [line for line in message.split("\n\nNotes:")[0].splitlines()[1:] if "|" in line][1:]
        return not rows or not all(SCALE_PARAM_NAME in row.split("|")[0] and "UNEXPECTED" in row for row in rows)


@contextmanager
def quiet_scale_report() -> Iterator[None]:
    """For the length of a `from_pretrained` of a checkpoint with learned scales: its load report listing them as
    unexpected keys is not shown (they are not dropped: `load_learned_scales` copies them in next)."""
    logger = logging.getLogger("transformers.modeling_utils")
    report_filter = _ScaleReportFilter()
    logger.addFilter(report_filter)
    try:
        yield
    finally:
        logger.removeFilter(report_filter)
