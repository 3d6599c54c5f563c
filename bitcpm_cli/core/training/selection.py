"""Which parameters train, from parameter NAMES alone (so it runs on the memory plan's synthetic table before anything
is loaded, and again on the loaded model).

- `finetuning_type: full` trains everything; with `trainable_keys` (the CANN Kit's setting) only the parameters whose
  name contains one of the patterns (a pattern with `*`, `?` or `[` is a glob on the whole name instead), in every
  layer: `[quant_alpha, norm]` trains the learned scales and every RMSNorm weight.
- `finetuning_type: freeze` is LLaMA-Factory's (`_setup_freeze_tuning`): the last `freeze_trainable_layers` decoder
  layers (the first -n when negative) train, only their `freeze_trainable_modules` (the first name component inside a
  layer, e.g. `mlp`, `self_attn`, `input_layernorm`; `all` for every one), plus `freeze_extra_modules` outside the
  layers (e.g. `embed_tokens`, `norm`, `lm_head`). One difference: LLaMA-Factory matches an extra module by substring
  over every name, so `norm` also unfreezes each layer's norms; here an extra module is matched outside the layers
  only, as its help text says ("modules apart from hidden layers").
- `finetuning_type: lora`: no parameter of the base model trains (the adapters are added by core.training.lora).
A pattern or module name that matches nothing is a ConfigError (exit 2), every one reported at once; so is a
selection that trains no parameter at all (`freeze_trainable_layers: 0` without `freeze_extra_modules`).
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from typing import Any, Iterable

from bitcpm_cli.core.errors import ConfigError, collect

FINETUNING_TYPES = ("full", "freeze", "lora")
_LAYER = re.compile(r"\.(\d+)\.([^.]+)")


@dataclass(frozen=True)
class Choice:
    """The settings that decide what trains (a TrainConfig's, or a memory-plan alternative's)."""

    finetuning_type: str = "full"
    trainable_keys: tuple[str, ...] = ()
    freeze_trainable_layers: int = 2
    freeze_trainable_modules: str = "all"
    freeze_extra_modules: str | None = None
    lora_rank: int = 8
    lora_target: str = "all"

    @classmethod
    def from_config(cls, config: Any) -> "Choice":
        return cls(getattr(config, "finetuning_type", "full"), tuple(getattr(config, "trainable_keys", None) or ()),
                   getattr(config, "freeze_trainable_layers", 2), getattr(config, "freeze_trainable_modules", "all"),
                   getattr(config, "freeze_extra_modules", None), getattr(config, "lora_rank", None) or 8,
                   getattr(config, "lora_target", None) or "all")

    @property
    def selective(self) -> bool:
        """Whether some parameters of the base model are frozen."""
        return self.finetuning_type != "full" or bool(self.trainable_keys)

    def describe(self) -> str:
        if self.finetuning_type == "freeze":
            n = self.freeze_trainable_layers
            layers = f"the last {n} layers" if n > 0 else f"the first {-n} layers"
            extra = f" + {self.freeze_extra_modules}" if self.freeze_extra_modules else ""
            return f"freeze: {self.freeze_trainable_modules} of {layers}{extra}"
        if self.finetuning_type == "lora":
            return f"lora: rank-{self.lora_rank} adapters on {self.lora_target}"
        if self.trainable_keys:
            return f"trainable_keys: {', '.join(self.trainable_keys)}"
        return "full: every parameter"


def split_list(value: str | None) -> list[str]:
    """LLaMA-Factory's comma-separated module lists."""
    return [part.strip() for part in (value or "").split(",") if part.strip()]


def key_matches(pattern: str, name: str) -> bool:
    """A trainable_keys pattern: a substring of the parameter name, or a glob on the whole name."""
    if any(c in pattern for c in "*?["):
        return fnmatch.fnmatchcase(name, pattern)
    return pattern in name


def layer_position(name: str) -> tuple[int, str] | None:
    """(layer index, the first name component inside the layer) of a decoder-layer parameter, else None."""
    found = _LAYER.search(name)
    return (int(found.group(1)), found.group(2)) if found else None


def trainable_names(names: Iterable[str], choice: Choice, where: str = "the model") -> set[str]:
    """The names that train under `choice`; raises one ConfigError naming every pattern that matches nothing."""
    names = list(names)
    if choice.finetuning_type == "lora":
        return set()
    if choice.finetuning_type == "freeze":
        return _freeze(names, choice, where)
    if not choice.trainable_keys:
        return set(names)
    chosen = {n for n in names if any(key_matches(k, n) for k in choice.trainable_keys)}
    missing = [k for k in choice.trainable_keys if not any(key_matches(k, n) for n in names)]
    collect([f"trainable_keys: {k!r} matches no parameter of {where}" for k in missing], ConfigError,
            "invalid trainable_keys", _names_hint(names))
    return chosen


def _freeze(names: list[str], choice: Choice, where: str) -> set[str]:
    positions = {n: layer_position(n) for n in names}
    layers = 1 + max((p[0] for p in positions.values() if p), default=-1)
    n = choice.freeze_trainable_layers
    chosen_layers = set(range(max(0, layers - n), layers)) if n > 0 else set(range(min(-n, layers)))
    hidden = sorted({p[1] for p in positions.values() if p})
    outside = sorted({n.rsplit(".", 2)[-2] for n, p in positions.items() if p is None and "." in n})
    modules, extra = split_list(choice.freeze_trainable_modules) or ["all"], split_list(choice.freeze_extra_modules)
    problems = [f"freeze_trainable_modules: {m!r} is no module inside a layer of {where} (choose from "
                f"{', '.join(hidden)})" for m in modules if m != "all" and m not in hidden]
    problems += [f"freeze_extra_modules: {m!r} is no module outside the layers of {where} (choose from "
                 f"{', '.join(outside)})" for m in extra if m not in outside]
    if not layers:
        problems.append(f"finetuning_type freeze: {where} has no numbered decoder layers")
    collect(problems, ConfigError, "invalid freeze settings", "fix the module names named above")
    chosen = set()
    for name, position in positions.items():
        if position is not None:
            if position[0] in chosen_layers and ("all" in modules or position[1] in modules):
                chosen.add(name)
        elif "." in name and name.rsplit(".", 2)[-2] in extra:
            chosen.add(name)
    if not chosen:  # nothing would train: refused now, not as autograd's "does not require grad" after loading
        raise ConfigError(f"finetuning_type freeze: freeze_trainable_layers {n}"
                          f"{' with freeze_extra_modules ' + ','.join(extra) if extra else ''} trains no parameter of "
                          f"{where}", hint="set freeze_trainable_layers to n (the last n layers) or -n (the first n), "
                                           "or name freeze_extra_modules (e.g. norm)")
    return chosen


def _names_hint(names: list[str]) -> str:
    sample = sorted({re.sub(r"\.\d+\.", ".N.", n) for n in names})
    return f"a pattern is a substring of a parameter name (or a glob); this model's are: {', '.join(sample[:16])}" + (
        ", ..." if len(sample) > 16 else "")


def apply_selection(model: Any, choice: Choice, where: str = "the loaded model") -> tuple[int, int]:
    """Freeze what does not train (requires_grad False, kept in its loaded dtype) and upcast what trains to float32,
    as LLaMA-Factory does. Re-checks the patterns against the real names. (trainable, frozen) element counts."""
    import torch

    names = dict(model.named_parameters())
    chosen = trainable_names(names, choice, where)
    trainable = frozen = 0
    for name, parameter in names.items():
        if name in chosen:
            if parameter.dtype != torch.float32:
                parameter.data = parameter.data.to(torch.float32)
            parameter.requires_grad_(True)
            trainable += parameter.numel()
        else:
            parameter.requires_grad_(False)
            frozen += parameter.numel()
    return trainable, frozen
