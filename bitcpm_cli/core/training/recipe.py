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
from bitcpm_cli.core.io.readers import read_structured_file
from bitcpm_cli.core.quant.scheme import ACTIVATION_SCHEMES, QUANT_TYPES

KD_LOSSES = ("kl", "mse")
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
    # How every quantized linear's input is fake-quantized (none | int8-token | q8_k | q8_0); None: the checkpoint's /
    # the scheme file's (per-layer choices kept); set, it applies to every quantized linear
    activations: str | None = None
    lr: float = 1e-4
    lr_scheduler: str = "cosine"
    warmup_steps: int = 0
    warmup_ratio: float = 0.0  # of the total steps (transformers 4's setting; 5 takes a float warmup_steps < 1)
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
    kd_loss: str = "kl"  # kl (temperature-softened, as today) | mse (on the logits, the CANN Kit's)
    # What trains (LLaMA-Factory's names and meaning; see core.training.selection)
    finetuning_type: str = "full"  # full | freeze | lora
    freeze_trainable_layers: int = 2  # freeze: the last n decoder layers train (the first -n when negative)
    freeze_trainable_modules: str = "all"  # freeze: modules inside those layers (comma-separated: mlp,self_attn)
    freeze_extra_modules: str | None = None  # freeze: modules outside the layers that train too (embed_tokens,norm)
    lora_rank: int = 8
    lora_alpha: int | None = None  # None: 2 x lora_rank (LLaMA-Factory's default)
    lora_dropout: float = 0.0  # only 0: the adapter lives inside the quantizer, there is no side branch to drop
    lora_target: str = "all"  # every linear but lm_head, or comma-separated module names
    trainable_keys: list[str] = field(default_factory=list)  # the CANN Kit's: only parameters matching these train
    learned_scales: bool | None = None  # None: the checkpoint's; true: group scales become parameters (quant_alpha)
    trust_remote_code: bool = False
    max_memory_gb: float | None = None  # plan against this much memory per device instead of the detected amount
    # Every other transformers.TrainingArguments field, under its Hugging Face name (report_to, optim, fsdp, ...)
    training_args: dict[str, Any] = field(default_factory=dict)

    def problems(self) -> list[str]:
        problems = []
        if not self.model:
            problems.append("model: not set; pass --model or set `model:` in the recipe")
        if not self.data:
            problems.append("data: no data files; pass --data or set `data:` in the recipe")
        if not self.output_dir:
            problems.append("output_dir: not set; pass --output-dir or set `output_dir:` in the recipe")
        if self.max_steps < 1 and not (self.max_steps == -1 and "num_train_epochs" in self.training_args):
            problems.append(f"max_steps: must be at least 1 (or -1 with num_train_epochs), got {self.max_steps}")
        for name in ("batch_size", "grad_accum", "block_size", "save_steps", "logging_steps"):
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
        problems += self.activation_problems()
        if not 0 <= self.kd_weight <= 1:
            problems.append(f"kd_weight: must be within [0, 1], got {self.kd_weight}")
        if not (math.isfinite(self.kd_temperature) and self.kd_temperature > 0):
            problems.append(f"kd_temperature: must be positive, got {self.kd_temperature}")
        if self.save_total_limit is not None and self.save_total_limit < 1:
            problems.append("save_total_limit: must be at least 1 (or null to keep every checkpoint)")
        if not 0 <= self.warmup_ratio < 1:
            problems.append(f"warmup_ratio: must be within [0, 1), got {self.warmup_ratio}")
        if self.warmup_ratio and self.warmup_steps:
            problems.append("warmup_steps and warmup_ratio are both set; keep one")
        if self.max_memory_gb is not None and self.max_memory_gb <= 0:
            problems.append(f"max_memory_gb: must be positive, got {self.max_memory_gb}")
        return problems + self.mode_problems()

    def mode_problems(self, given: set[str] | None = None) -> list[str]:
        """What trains, KD and learned scales; `given`: the settings the user set (a LoRA or freeze setting given
        for another finetuning_type is refused, never silently dropped). A setting given at its default value drops
        nothing: a run's saved bitcpm_train_config.yaml, which lists every setting, is a valid --config."""
        from bitcpm_cli.core.training.selection import FINETUNING_TYPES

        defaults = type(self)()
        given = {n for n in given or () if getattr(self, n, None) != getattr(defaults, n, None)}
        problems = []
        if self.kd_loss not in KD_LOSSES:
            problems.append(f"kd_loss: {self.kd_loss!r} is not one of {', '.join(KD_LOSSES)}"
                            f"{did_you_mean(self.kd_loss, KD_LOSSES)}")
        if self.finetuning_type not in FINETUNING_TYPES:
            problems.append(f"finetuning_type: {self.finetuning_type!r} is not one of {', '.join(FINETUNING_TYPES)}"
                            f"{did_you_mean(self.finetuning_type, FINETUNING_TYPES)}")
        problems += lora_setting_problems(self)
        if self.trainable_keys and self.finetuning_type != "full":
            problems.append(f"trainable_keys: only with finetuning_type full (it chooses what trains itself); "
                            f"finetuning_type is {self.finetuning_type}")
        if any(not key.strip() for key in self.trainable_keys):
            problems.append("trainable_keys: an empty pattern would match every parameter")
        for prefix, kind in (("lora_", "lora"), ("freeze_", "freeze")):
            stray = sorted(n for n in given or () if n.startswith(prefix))
            if stray and self.finetuning_type != kind:
                problems.append(f"{', '.join(stray)}: set for finetuning_type {kind}, but finetuning_type is "
                                f"{self.finetuning_type} (set finetuning_type: {kind}, or drop them)")
        given = given or set()
        if {"kd_loss", "kd_weight", "kd_temperature"} & given and not self.teacher:
            problems.append(f"{', '.join(sorted({'kd_loss', 'kd_weight', 'kd_temperature'} & given))}: knowledge "
                            "distillation runs only with a teacher; set teacher (a float model folder)")
        elif "kd_temperature" in given and self.kd_loss == "mse":
            problems.append("kd_temperature: kd_loss mse compares the logits themselves (no temperature); drop it")
        if self.learned_scales and self.quant_type is not None and self.quant_type != "ternary":
            problems.append(f"learned_scales: quant_type {self.quant_type} has no learned scale (only ternary has)")
        return problems

    def activation_problems(self) -> list[str]:
        """The `activations` setting: a known scheme, and a quantized run to apply it to."""
        if self.activations is None:
            return []
        if self.activations not in ACTIVATION_SCHEMES:
            return [f"activations: {self.activations!r} is not one of {', '.join(ACTIVATION_SCHEMES)}"
                    f"{did_you_mean(self.activations, ACTIVATION_SCHEMES)}"]
        if self.activations != "none" and self.quant_type == "none":
            return [f"activations: {self.activations} quantizes the input of the quantized linears, and quant_type "
                    "none trains in full precision (set a quant_type, or drop activations)"]
        return []

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def lora_setting_problems(config: Any) -> list[str]:
    """The LoRA settings' own problems (nothing loaded): rank, alpha, dropout (core.training.lora checks them
    again where the adapter is built)."""
    problems = []
    rank = getattr(config, "lora_rank", 8)
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        problems.append(f"lora_rank: must be a whole number of at least 1, got {rank}")
    alpha = getattr(config, "lora_alpha", None)
    if alpha is not None and not (isinstance(alpha, (int, float)) and alpha > 0):
        problems.append(f"lora_alpha: must be a positive number, got {alpha}")
    dropout = getattr(config, "lora_dropout", 0.0)
    if dropout != 0:
        problems.append(f"lora_dropout: must be 0, got {dropout}: the adapter lives inside the quantizer "
                        "(Q(W + alpha/r B A) x), there is no side branch for dropout to act on")
    return problems


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
    from bitcpm_cli.core.io.readers import parse_yaml

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


# Hugging Face TrainingArguments names of bitcpm's own settings (both spellings work; bitcpm's is kept as an alias).
HF_ALIASES = {"learning_rate": "lr", "lr_scheduler_type": "lr_scheduler", "per_device_train_batch_size": "batch_size",
              "gradient_accumulation_steps": "grad_accum", "activation_checkpointing": "gradient_checkpointing"}


# TrainingArguments fields bitcpm must set itself, with what to use instead.
HF_REFUSED = {
    "remove_unused_columns": "bitcpm's data collators need every column; it is always false",
    "logging_nan_inf_filter": "bitcpm stops on a NaN/inf loss and keeps the last good checkpoint; it is always false",
    "use_cpu": "use device=cpu",
    "resume_from_checkpoint": "use resume=true (continues from the latest complete checkpoint in output_dir)",
    "local_rank": "the launcher (torchrun, deepspeed, accelerate launch) sets it",
}


def hf_training_fields() -> dict[str, Any]:
    """Every transformers.TrainingArguments init field -> its dataclass Field (type and default)."""
    from transformers import TrainingArguments

    return {f.name: f for f in dataclasses.fields(TrainingArguments) if f.init}


def _coerce_hf(name: str, value: Any, annotation: Any, where: str) -> tuple[Any, str | None]:
    """Scalars are converted like bitcpm's own settings; mappings, lists and enums are passed as written."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)] or [annotation]
    if value is None or not all(a in (int, float, bool, str) for a in args) or len(args) > 1:
        return value, None
    return _coerce(name, value, args[0] | None, where)


def resolve_config(cls: type, recipe: str | Path | None = None, flags: dict[str, Any] | None = None,
                   overrides: list[str] | None = None):
    """defaults < YAML recipe < flags < key=value; unknown keys and bad values are reported together.

    `cls` is TrainConfig or a subclass of it (SftConfig). Settings take bitcpm's names or any
    transformers.TrainingArguments name (`learning_rate` for `lr`, `report_to`, `fsdp`, ...); naming one setting
    twice in one layer with two values is reported as a conflict.
    """
    types_by_name = _field_types(cls)
    hf_fields = hf_training_fields()
    known = list(types_by_name) + list(HF_ALIASES) + list(hf_fields)
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
    extra: dict[str, Any] = {}
    for where, layer in layers:
        spelled: dict[str, tuple[str, Any]] = {}  # bitcpm name -> (key as written, value) within this layer
        for key, value in layer.items():
            name = HF_ALIASES.get(key, key)
            if name == "training_args":
                layer_extra = value if isinstance(value, dict) else None
                if layer_extra is None:
                    problems.append(f"{where}training_args: must be a mapping of TrainingArguments fields")
                    continue
                for hf_key, hf_value in layer_extra.items():
                    _take_hf(str(hf_key), hf_value, hf_fields, types_by_name, where, extra, problems, known)
                continue
            if name not in types_by_name:
                if key in hf_fields or key in HF_REFUSED:
                    _take_hf(key, value, hf_fields, types_by_name, where, extra, problems, known)
                else:
                    problems.append(f"{where}unknown setting {key!r}{did_you_mean(key, known)}")
                continue
            coerced, problem = _coerce(key, value, types_by_name[name], where)
            if problem:
                problems.append(problem)
                continue
            if name in spelled and spelled[name][1] != coerced:
                problems.append(f"{where}{spelled[name][0]} and {key} name the same setting with different values "
                                f"({spelled[name][1]!r} vs {coerced!r}); keep one")
                continue
            spelled[name] = (key, coerced)
            values[name] = coerced
    if extra:
        values["training_args"] = extra
        if "num_train_epochs" in extra and "max_steps" not in values:
            values["max_steps"] = -1  # the epochs decide, as in transformers
    collect(problems, ConfigError, "invalid training settings", "fix the settings named above")
    config = cls(**values)
    problems = config.problems()
    problems += [p for p in config.mode_problems(set(values)) if p not in problems]
    collect(problems, ConfigError, "invalid training settings", "fix the settings named above")
    return config


def _take_hf(key: str, value: Any, hf_fields: dict[str, Any], types_by_name: dict[str, Any], where: str,
             extra: dict[str, Any], problems: list[str], known: list[str]) -> None:
    """A TrainingArguments field that is not one of bitcpm's own settings, into `training_args`."""
    if key in HF_REFUSED:
        problems.append(f"{where}{key}: bitcpm sets this itself; {HF_REFUSED[key]}")
    elif key in types_by_name or key in HF_ALIASES:
        problems.append(f"{where}training_args.{key}: set it as a top-level setting ({HF_ALIASES.get(key, key)})")
    elif key not in hf_fields:
        problems.append(f"{where}unknown setting {key!r}{did_you_mean(key, known)}")
    else:
        coerced, problem = _coerce_hf(key, value, hf_fields[key].type, where)
        if problem:
            problems.append(problem)
        else:
            extra[key] = coerced


def list_settings(cls: type) -> list[dict[str, Any]]:
    """Every setting a config class accepts: name, default, aliases, and where it goes (bitcpm or TrainingArguments).

    bitcpm's settings come first with bitcpm's defaults; then every other TrainingArguments field with its default.
    """
    aliases: dict[str, list[str]] = {}
    for hf_name, name in HF_ALIASES.items():
        aliases.setdefault(name, []).append(hf_name)
    defaults = cls()
    rows = [{"name": f.name, "default": getattr(defaults, f.name), "aliases": aliases.get(f.name, []),
             "source": "bitcpm"} for f in dataclasses.fields(cls) if f.name != "training_args"]
    own = {row["name"] for row in rows}
    for name, hf_field in hf_training_fields().items():
        if name in own or name in HF_ALIASES:
            continue
        if hf_field.default is not dataclasses.MISSING:
            default = hf_field.default
        elif hf_field.default_factory is not dataclasses.MISSING:
            default = hf_field.default_factory()
        else:
            default = None
        rows.append({"name": name, "default": default, "aliases": [],
                     "source": "refused: " + HF_REFUSED[name] if name in HF_REFUSED else "TrainingArguments"})
    return rows


def save_config(config: Any, path: Path) -> None:
    import yaml

    path.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
