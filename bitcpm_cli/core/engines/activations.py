"""The activation scheme a model folder runs with in the transformers engine (`infer`, `eval`).

Decided from config.json and the weight headers before any weight is read (`plan_activations`), then applied to the
loaded model (`apply_activations`):

- a QAT checkpoint: its `bitcpm_quant` scheme; `prepare` makes each quantized linear quantize its input, and `fuse`
  keeps that as a forward pre-hook;
- a packed folder: its `bitcpm_quant` scheme's activations of each packed linear, hooked after unpacking;
- a fused folder: the `bitcpm_activations` record of its config.json (`convert` writes it), checked against the
  tensor shapes, hooked after loading; without a record, full-precision activations (what stock transformers runs).

An override (`--activations`) makes every quantized linear run one scheme: the QAT scheme's linears, the packed
linears, the linears a fused record names, and in a fused folder without a record the linears whose weights are fused
(at most {-a, 0, +a} in each group). A float model has no quantized linears: it runs unchanged, with a note. A block
that does not divide a linear's inputs is refused, naming the layer, before any weight is read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from bitcpm_cli.core.engines.base import check_activations_option
from bitcpm_cli.core.errors import QuantError, collect
from bitcpm_cli.core.quant.activations import (
    FUSED_CONFIG_KEY,
    attach_activations,
    block_problem,
    read_fused_record,
    recorded_activations,
)
from bitcpm_cli.core.quant.scheme import QuantScheme


@dataclass
class ActivationPlan:
    """What `apply_activations` does once the weights are loaded."""

    override: str | None
    source: str  # where the scheme comes from, for the note
    scheme: QuantScheme | None = None  # a QAT checkpoint: the scheme `prepare` runs (the override applied)
    modules: dict[str, str] = field(default_factory=dict)  # fused (record) / packed: {module: scheme} to hook
    candidates: tuple[str, ...] = ()  # a fused folder without a record, with an override: hook the fused ones


def plan_activations(path: Path, config: Mapping[str, Any], specs: Mapping[str, Any], packed_shapes: Mapping | None,
                     override: str | None) -> ActivationPlan:
    """The activation scheme of every linear, from config.json and the tensor headers (`specs`; `packed_shapes`:
    {linear: [out, in]} of a packed folder, else None); every problem in one error, before any weight is read."""
    check_activations_option(override)
    scheme = QuantScheme.from_config(config)
    given = f"--activations {override}"
    if packed_shapes is not None:
        recorded = scheme.for_module if scheme is not None else None
        modules = {name: override or (recorded(name).activations if recorded else "none") for name in packed_shapes}
        _check_blocks(modules, {n: s[1] for n, s in packed_shapes.items()}, override, path)
        return ActivationPlan(override, given if override else "recorded in config.json's bitcpm_quant",
                              modules=modules)
    shapes = {name: tuple(spec.shape) for name, spec in specs.items()}
    if scheme is not None:
        from bitcpm_cli.core.quant.qat import plan_state_dict

        recorded = scheme.with_activations("none") if override else scheme  # the override's blocks: checked below
        targets = plan_state_dict(shapes, {n: s.dtype for n, s in specs.items()}, recorded)
        modules = {name.removesuffix(".weight"): override for name in targets}
        _check_blocks(modules, {m: shapes[f"{m}.weight"][1] for m in modules}, override, path)
        return ActivationPlan(override, given if override else "recorded in config.json's bitcpm_quant",
                              scheme=scheme.with_activations(override) if override else scheme)
    if FUSED_CONFIG_KEY in config:
        modules = read_fused_record(config[FUSED_CONFIG_KEY], shapes, f"{path / 'config.json'}")
        if override:
            modules = {name: override for name in modules}
            _check_blocks(modules, {m: shapes[f"{m}.weight"][1] for m in modules}, override, path)
        return ActivationPlan(override, given if override else f"recorded in config.json's {FUSED_CONFIG_KEY}",
                              modules=modules)
    if not override or override == "none":
        return ActivationPlan(override, given if override else "none recorded")
    from bitcpm_cli.core.quant.qat import plan_state_dict

    # The linears a QAT scheme would quantize (embeddings and lm_head stay in full precision); the fused ones among
    # them are known once the weights are loaded.
    candidates = plan_state_dict(shapes, {n: s.dtype for n, s in specs.items()}, QuantScheme(group_size=0))
    names = tuple(name.removesuffix(".weight") for name in candidates)
    _check_blocks({m: override for m in names}, {m: shapes[f"{m}.weight"][1] for m in names}, override, path)
    return ActivationPlan(override, f"{given}, on the linears whose weights are fused", candidates=names)


def _check_blocks(modules: Mapping[str, str], in_features: Mapping[str, int], override: str | None,
                  path: Path) -> None:
    """Every linear's scheme must have a block that divides its inputs: an override's, or a packed folder's recorded
    one (a QAT scheme and a fused record are checked where they are read)."""
    problems = [p for name, scheme in modules.items() if (p := block_problem(scheme, in_features[name], name))]
    if override:
        collect(problems, QuantError, f"--activations {override} does not fit {path}",
                "pick a scheme whose block divides every quantized linear's in_features (int8-token has no block), "
                "or leave --activations out to run the model's own scheme")
    collect(problems, QuantError, f"the activations in {path / 'config.json'}'s bitcpm_quant do not fit its layers",
            "the packed folder was not written by bitcpm or was edited: convert the QAT checkpoint again")


def apply_activations(model: Any, plan: ActivationPlan, kind: str) -> tuple[str, list[str]]:
    """Hook the planned activation quantization into a loaded model (a QAT model was prepared with `plan.scheme`
    already); (the activation summary for the results, the notes)."""
    if plan.modules:
        attach_activations(model, plan.modules)
    elif plan.candidates:
        fused = [name for name in plan.candidates if _is_fused(model.get_submodule(name).weight)]
        attach_activations(model, {name: plan.override for name in fused})
    running = recorded_activations(model)
    notes = []
    if running:
        counts: dict[str, int] = {}
        for scheme in running.values():
            counts[scheme] = counts.get(scheme, 0) + 1
        spread = ", ".join(f"{scheme} on {count} linear{'s' if count != 1 else ''}"
                           for scheme, count in sorted(counts.items()))
        notes.append(f"activations: {spread} ({plan.source})")
    elif plan.override not in (None, "none"):
        what = "a float model" if kind == "float" else "no fused linears found"
        notes.append(f"activations: none (--activations {plan.override} applies to quantized linears; {what}: "
                     "the model runs with full-precision activations)")
    elif plan.override == "none":
        notes.append("activations: none on every linear (--activations none)")
    summary = ", ".join(sorted(set(running.values()))) or "none"
    import torch

    full = {n for n, scheme in plan.modules.items() if scheme == "none"}
    if plan.scheme is not None:  # a QAT checkpoint's quantized linears (fused on load or not)
        specs = {n: plan.scheme.for_module(n) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
        full |= {n for n, spec in specs.items() if spec.enabled and spec.activations == "none"}
    if running and full:  # some quantized linears run full-precision activations: the summary says so
        summary += f" (none in {len(full)} linear{'s' if len(full) != 1 else ''})"
    return summary, notes


def _is_fused(weight: Any) -> bool:
    from bitcpm_cli.core.quant import FUSED_GROUP_CANDIDATES, fused_scales

    return any(fused_scales(weight.detach(), group) is not None for group in FUSED_GROUP_CANDIDATES)
