"""Training recipes: defaults < YAML < flags < key=value, validated with every problem reported at once."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bitcpm_cli.core.errors import ConfigError, collect, did_you_mean
from bitcpm_cli.core.quant.scheme import QUANT_TYPES, read_structured_file

SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup", "cosine_with_restarts", "polynomial")


@dataclass
class TrainConfig:
    """Continued pre-training under the ternary fake quantizer (`bitcpm train`)."""

    model: str | None = None
    data: list[str] = field(default_factory=list)
    output_dir: str | None = None
    max_steps: int = 100
    quant_type: str | None = None  # None: the checkpoint's bitcpm_quant, else ternary
    group_size: int | None = None  # None: the checkpoint's bitcpm_quant, else 128
    scheme: str | None = None  # a scheme file (bitcpm_quant block or CANN strategy)
    lr: float = 1e-4
    lr_scheduler: str = "cosine"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    batch_size: int = 1
    grad_accum: int = 1
    block_size: int = 512
    save_steps: int = 100
    save_total_limit: int | None = 3
    logging_steps: int = 10
    seed: int = 42
    device: str = "auto"
    bf16: bool = False
    gradient_checkpointing: bool = False
    deepspeed: str | None = None
    resume: bool = False
    teacher: str | None = None
    kd_temperature: float = 2.0
    kd_weight: float = 0.5
    trust_remote_code: bool = False

    def problems(self) -> list[str]:
        problems = []
        if not self.model:
            problems.append("model: not set; pass --model or set `model:` in the recipe")
        if not self.data:
            problems.append("data: no data files; pass --data or set `data:` in the recipe")
        if not self.output_dir:
            problems.append("output_dir: not set; pass --output-dir or set `output_dir:` in the recipe")
        for name in ("max_steps", "batch_size", "grad_accum", "block_size", "save_steps", "logging_steps"):
            if getattr(self, name) < 1:
                problems.append(f"{name}: must be at least 1, got {getattr(self, name)}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            problems.append(f"lr: must be a positive number, got {self.lr}")
        if self.warmup_steps < 0:
            problems.append(f"warmup_steps: must be at least 0, got {self.warmup_steps}")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                problems.append(f"{name}: must be within [0, 1), got {getattr(self, name)}")
        if not (math.isfinite(self.adam_epsilon) and self.adam_epsilon > 0):
            problems.append(f"adam_epsilon: must be a small positive number, got {self.adam_epsilon}")
        for name in ("weight_decay", "max_grad_norm"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                problems.append(f"{name}: must be a finite number >= 0, got {getattr(self, name)}")
        if not 0 <= self.seed < 2**32:
            problems.append(f"seed: must be within [0, 2**32), got {self.seed}")
        if self.lr_scheduler not in SCHEDULERS:
            problems.append(f"lr_scheduler: {self.lr_scheduler!r} is not one of {', '.join(SCHEDULERS)}"
                            f"{did_you_mean(self.lr_scheduler, SCHEDULERS)}")
        if self.quant_type is not None and self.quant_type not in QUANT_TYPES:
            problems.append(f"quant_type: {self.quant_type!r} is not one of {', '.join(QUANT_TYPES)}"
                            f"{did_you_mean(self.quant_type, QUANT_TYPES)}")
        if self.group_size is not None and self.group_size < -1:
            problems.append(f"group_size: {self.group_size} is invalid; use -1, 0 or a positive number")
        if not 0 <= self.kd_weight <= 1:
            problems.append(f"kd_weight: must be within [0, 1], got {self.kd_weight}")
        if not (math.isfinite(self.kd_temperature) and self.kd_temperature > 0):
            problems.append(f"kd_temperature: must be positive, got {self.kd_temperature}")
        if self.save_total_limit is not None and self.save_total_limit < 1:
            problems.append("save_total_limit: must be at least 1 (or null to keep every checkpoint)")
        return problems

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(name: str, value: Any, annotation: Any, where: str) -> tuple[Any, str | None]:
    """Convert a YAML / flag / key=value value to the field's type; (value, problem)."""
    args = typing.get_args(annotation)
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), annotation) if args and (
        typing.get_origin(annotation) in (typing.Union, types.UnionType)) else annotation
    if value is None:
        return (None, None) if optional else (None, f"{where}{name}: may not be null")
    origin = typing.get_origin(base)
    try:
        if origin is list:
            items = value if isinstance(value, list) else [v for v in str(value).split(",") if v]
            return [str(v) for v in items], None
        if base is bool:
            if isinstance(value, bool):
                return value, None
            text = str(value).lower()
            if text in ("true", "1", "yes", "on"):
                return True, None
            if text in ("false", "0", "no", "off"):
                return False, None
            raise ValueError
        if base is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value), None
        if base is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value), None
        return str(value), None
    except (TypeError, ValueError):
        type_name = getattr(base, "__name__", str(base))
        return None, f"{where}{name}: {value!r} is not a valid {type_name}"


def _parse_overrides(overrides: list[str]) -> tuple[dict[str, Any], list[str]]:
    from bitcpm_cli.core.readers import parse_yaml

    values, problems = {}, []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            problems.append(f"{item!r}: overrides are key=value (e.g. lr=3e-4)")
            continue
        try:
            values[key.strip().replace("-", "_")] = parse_yaml(raw, f"override {key.strip()}") if raw.strip() else None
        except ConfigError:
            values[key.strip().replace("-", "_")] = raw
    return values, problems


def resolve_config(cls: type, recipe: str | Path | None = None, flags: dict[str, Any] | None = None,
                   overrides: list[str] | None = None):
    """defaults < YAML recipe < flags < key=value; unknown keys and bad values are reported together."""
    types_by_name = _field_types(cls)
    known = list(types_by_name)
    layers: list[tuple[str, dict[str, Any]]] = []
    problems: list[str] = []
    if recipe is not None:
        data = read_structured_file(recipe, "recipe")
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"recipe must be a mapping of settings ({recipe})", hint="e.g. `max_steps: 100`")
        layers.append((f"{recipe}: ", data))
    layers.append(("", {k: v for k, v in (flags or {}).items() if v is not None}))
    parsed, override_problems = _parse_overrides(overrides or [])
    problems += override_problems
    layers.append(("key=value ", parsed))
    values: dict[str, Any] = {}
    for where, layer in layers:
        for key, value in layer.items():
            if key not in types_by_name:
                problems.append(f"{where}unknown setting {key!r}{did_you_mean(key, known)}")
                continue
            coerced, problem = _coerce(key, value, types_by_name[key], where)
            if problem:
                problems.append(problem)
            else:
                values[key] = coerced
    collect(problems, ConfigError, "invalid training settings", "fix the settings named above")
    config = cls(**values)
    collect(config.problems(), ConfigError, "invalid training settings", "fix the settings named above")
    return config


def save_config(config: Any, path: Path) -> None:
    import yaml

    path.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
