"""Quantization schemes: what to quantize, how, and how that is written into config.json.

A scheme is the `bitcpm_quant` block of a QAT checkpoint's config.json (README, "Quantization semantics")::

    {"quant_type": "ternary", "group_size": 128,
     "modules_to_not_convert": ["lm_head", "embed_tokens"], "layers": {}}

`layers` maps a module-name pattern to per-layer overrides ({quant_type, group_size, activations}). `activations`
(none | int8-token | q8_k | q8_0) names how each quantized linear's input is quantized (see quant/activations.py).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from bitcpm_cli.core.errors import ConfigError, collect, did_you_mean
from bitcpm_cli.core.io.readers import read_structured_file

QUANT_TYPES = ("ternary", "binary", "int2", "int4", "int8", "none")
DEFAULT_SKIP = ("lm_head", "embed_tokens")
SCHEME_KEYS = ("quant_type", "group_size", "modules_to_not_convert", "layers", "packed", "learned_scales",
               "activations")
OVERRIDE_KEYS = ("quant_type", "group_size", "activations")
# How a quantized linear's input is quantized (quant/activations.py computes them); the blocked ones quantize blocks
# of this many values along the input dimension, which must divide in_features.
ACTIVATION_SCHEMES = ("none", "int8-token", "q8_k", "q8_0")
ACTIVATION_BLOCKS = {"q8_k": 256, "q8_0": 32}
# Module names (their last part contains one of these) that are embeddings, never quantized linears.
EMBEDDING_NAMES = ("embed", "wte", "wpe", "embeddings")


def is_embedding_name(module_name: str) -> bool:
    return any(e in module_name.rsplit(".", 1)[-1] for e in EMBEDDING_NAMES)
CONFIG_KEY = "bitcpm_quant"
# Quant types whose scale can be a trained parameter (LSQ): ternary, whose one level Qp = 1 has the absmean scale.
LEARNED_SCALE_TYPES = ("ternary",)


@dataclass(frozen=True)
class LayerQuant:
    """How one weight is quantized: the resolved (quant_type, group_size) of a layer, and whether its scales are
    trained parameters (`learned`: stored beside the weight as `quant_alpha`) rather than computed from it, and how
    its input is quantized (`activations`)."""

    quant_type: str
    group_size: int
    learned: bool = False
    activations: str = "none"

    @property
    def bits(self) -> int | None:
        """Integer bit width for intN; None for ternary / binary / none."""
        return int(self.quant_type[3:]) if self.quant_type.startswith("int") else None

    @property
    def enabled(self) -> bool:
        return self.quant_type != "none"


def _problems_for(quant_type: Any, group_size: Any, where: str) -> list[str]:
    """Problems with a (quant_type, group_size) pair; `...` stands for a value that was not given."""
    problems = []
    if quant_type is not ... and quant_type not in QUANT_TYPES:
        problems.append(
            f"{where}quant_type {quant_type!r} is not one of {', '.join(QUANT_TYPES)}"
            f"{did_you_mean(str(quant_type), QUANT_TYPES)}"
        )
    if group_size is not ... and (isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < -1):
        problems.append(
            f"{where}group_size {group_size!r} is invalid: use -1 (one group per output row), "
            "0 (one group per tensor) or a positive number of input channels"
        )
    return problems


def _activation_problems(activations: Any, quant_type: Any, where: str) -> list[str]:
    """Problems with an activation scheme (`...`: not given); `quant_type` is the layer's resolved one."""
    if activations is ...:
        return []
    if activations not in ACTIVATION_SCHEMES:
        return [f"{where}activations {activations!r} is not one of {', '.join(ACTIVATION_SCHEMES)}"
                f"{did_you_mean(str(activations), ACTIVATION_SCHEMES)}"]
    if activations != "none" and quant_type == "none":
        return [f"{where}activations {activations} quantize the input of a quantized linear, and quant_type none "
                "keeps this one in full precision"]
    return []


def _matches(pattern: str, name: str) -> bool:
    """A pattern matches a whole module name, or its dotted tail ('mlp.down_proj', 'lm_head')."""
    return re.fullmatch(pattern, name) is not None or re.fullmatch(rf".*\.(?:{pattern})", name) is not None


@dataclass(frozen=True)
class QuantScheme:
    quant_type: str = "ternary"
    group_size: int = 128
    modules_to_not_convert: tuple[str, ...] = DEFAULT_SKIP
    layers: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    packed: bool = False
    learned_scales: bool = False
    activations: str = "none"
    # What reading the scheme could not carry over exactly (e.g. a CANN file's calibrated activation scales): commands
    # that load it report these. Not part of the scheme's identity or of config.json.
    notes: tuple[str, ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        # Normalise containers so equal schemes compare equal and stay immutable in spirit.
        object.__setattr__(self, "modules_to_not_convert", tuple(self.modules_to_not_convert))
        # (an override that is not a mapping stays as it is, to be reported below rather than coerced or crash dict())
        object.__setattr__(self, "layers", {k: dict(v) if isinstance(v, Mapping) else v
                                            for k, v in dict(self.layers).items()})
        object.__setattr__(self, "notes", tuple(self.notes))
        problems = _problems_for(self.quant_type, self.group_size, "")
        problems += _activation_problems(self.activations, self.quant_type, "")
        for name in self.modules_to_not_convert:
            if not isinstance(name, str) or not name:
                problems.append(f"modules_to_not_convert entry {name!r} must be a non-empty module name")
        for pattern, override in self.layers.items():
            where = f"layers[{pattern!r}]: "
            try:
                re.compile(pattern)
            except (re.error, TypeError) as exc:  # TypeError: a key that is no string (YAML `3:`)
                problems.append(f"{where}pattern is not a valid regular expression ({exc})")
            if not isinstance(override, dict):
                problems.append(f"{where}must be a mapping with quant_type and/or group_size")
                continue
            for key in override:
                if key not in OVERRIDE_KEYS:
                    problems.append(f"{where}unknown key {key!r}{did_you_mean(key, OVERRIDE_KEYS)}")
            problems += _problems_for(override.get("quant_type", ...), override.get("group_size", ...), where)
            problems += _activation_problems(override.get("activations", ...),
                                             override.get("quant_type", self.quant_type), where)
        if not isinstance(self.packed, bool):
            problems.append(f"packed must be true or false, not {self.packed!r}")
        problems += self._learned_scale_problems()
        collect(problems, ConfigError, "invalid quantization scheme",
                "fix the values named above (bitcpm_quant in config.json, the recipe, or the flags)")

    def _learned_scale_problems(self) -> list[str]:
        """learned_scales needs a quant type with a learnable scale in every layer it quantizes."""
        if not isinstance(self.learned_scales, bool):
            return [f"learned_scales must be true or false, not {self.learned_scales!r}"]
        if not self.learned_scales:
            return []
        types = {self.quant_type} | {o.get("quant_type", self.quant_type) for o in self.layers.values()
                                     if isinstance(o, dict)}
        return [f"learned_scales: quant_type {t!r} has no learned scale (only {', '.join(LEARNED_SCALE_TYPES)} has)"
                for t in sorted(types, key=str) if t not in LEARNED_SCALE_TYPES and t != "none" and t in QUANT_TYPES]

    def learned_override_problems(self, quant_type: str | None, group_size: int | None) -> list[str]:
        """Why a quant type or group size other than this learned-scales scheme's own cannot use its stored scales
        (one per group of its own group size, trained for its quant type): `convert` and `train` refuse them."""
        if not self.learned_scales:
            return []
        problems = []
        if quant_type is not None and quant_type != self.quant_type:
            problems.append(f"--quant-type {quant_type} cannot use the checkpoint's learned scales (quant_alpha), "
                            f"which were trained for {self.quant_type}")
        if group_size is not None and group_size != self.group_size:
            problems.append(f"--group-size {group_size} cannot use the checkpoint's learned scales (quant_alpha), "
                            f"which hold one scale per group of group_size {self.group_size}")
        return problems

    # ---- resolution -------------------------------------------------------------------------
    def skips(self, module_name: str) -> bool:
        """True when the module (or a parent of it) is listed in modules_to_not_convert."""
        parts = module_name.split(".")
        suffixes = {".".join(parts[i:]) for i in range(len(parts))}
        prefixes = {".".join(parts[:i]) for i in range(1, len(parts) + 1)}
        return any(entry in suffixes or entry in prefixes for entry in self.modules_to_not_convert)

    def for_module(self, module_name: str) -> LayerQuant:
        """The quantization of one module: skip list first, then the first matching override."""
        if self.skips(module_name):
            return LayerQuant("none", self.group_size)
        quant_type, group_size, activations = self.quant_type, self.group_size, self.activations
        for pattern, override in self.layers.items():
            if _matches(pattern, module_name):
                quant_type = override.get("quant_type", quant_type)
                group_size = override.get("group_size", group_size)
                activations = override.get("activations", activations)
                break
        if quant_type == "none":  # a full-precision layer: its input stays full precision too
            return LayerQuant("none", group_size)
        return LayerQuant(quant_type, group_size, learned=self.learned_scales, activations=activations)

    def replace(self, **changes: Any) -> "QuantScheme":
        values = self.to_dict()
        values.update({k: v for k, v in changes.items() if v is not None})
        replaced = QuantScheme.from_dict(values)
        object.__setattr__(replaced, "notes", self.notes)
        return replaced

    def with_activations(self, activations: str) -> "QuantScheme":
        """This scheme with every quantized linear's input quantized by `activations` (per-layer choices dropped):
        an override such as `--activations none`."""
        layers = {p: {k: v for k, v in o.items() if k != "activations"} for p, o in self.layers.items()}
        return self.replace(activations=activations, layers={p: o for p, o in layers.items() if o} or {})

    def activation_summary(self) -> str:
        """The activation scheme(s) in one word or a short list: 'none', 'q8_k', 'q8_k, some layers none'."""
        others = sorted({o["activations"] for o in self.layers.values() if o.get("activations", self.activations)
                         != self.activations})
        return self.activations + (f" ({', '.join(others)} in some layers)" if others else "")

    # ---- config.json --------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "quant_type": self.quant_type,
            "group_size": self.group_size,
            "modules_to_not_convert": list(self.modules_to_not_convert),
            "layers": {k: dict(v) for k, v in self.layers.items()},
        }
        if self.packed:
            out["packed"] = True
        if self.learned_scales:
            out["learned_scales"] = True
        if self.activations != "none":
            out["activations"] = self.activations
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = CONFIG_KEY) -> "QuantScheme":
        if not isinstance(data, Mapping):
            raise ConfigError(f"{where} must be a JSON object, not {type(data).__name__}",
                              hint='e.g. {"quant_type": "ternary", "group_size": 128}')
        unknown = [k for k in data if k not in SCHEME_KEYS]
        if unknown:
            raise ConfigError(
                f"{where}: unknown key(s) " + ", ".join(f"{k!r}{did_you_mean(k, SCHEME_KEYS)}" for k in unknown),
                hint=f"known keys: {', '.join(SCHEME_KEYS)}",
            )
        skip = data.get("modules_to_not_convert", DEFAULT_SKIP)
        if skip is None:
            skip = ()
        if isinstance(skip, str) or not isinstance(skip, (list, tuple)):
            raise ConfigError(f"{where}.modules_to_not_convert must be a list of module names, not {skip!r}",
                              hint='e.g. ["lm_head", "embed_tokens"]')
        layers = data.get("layers") or {}
        if not isinstance(layers, Mapping):
            raise ConfigError(f"{where}.layers must map a module-name pattern to overrides, not {layers!r}",
                              hint='e.g. {"mlp\\\\.down_proj": {"group_size": -1}}')
        return cls(
            quant_type=data.get("quant_type", "ternary"),
            group_size=data.get("group_size", 128),
            modules_to_not_convert=tuple(skip),
            layers=layers,
            packed=data.get("packed", False),
            learned_scales=data.get("learned_scales", False),
            activations=data.get("activations", "none"),
        )

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | Any) -> "QuantScheme | None":
        """The scheme recorded in a config.json dict or a transformers config; None for a float model."""
        block = config.get(CONFIG_KEY) if isinstance(config, Mapping) else getattr(config, CONFIG_KEY, None)
        return None if block is None else cls.from_dict(block)


# ---- CANN-style per-layer strategy files ------------------------------------------------------
_BITS_TO_TYPE = {1: "binary", 1.58: "ternary", 2: "int2", 4: "int4", 8: "int8", 16: "none", 32: "none"}


def _weight_quant_type(weight: Mapping[str, Any], where: str, problems: list[str]) -> str | None:
    if "quant_type" in weight:
        return weight["quant_type"]
    bit = weight.get("bit")
    try:
        bit = float(bit) if isinstance(bit, str) else bit
    except ValueError:
        pass
    if bit in _BITS_TO_TYPE:
        return _BITS_TO_TYPE[bit]
    if isinstance(bit, str) and bit.lower() in QUANT_TYPES:
        return bit.lower()
    problems.append(f"{where}: weight.bit {bit!r} is not supported; use 1.58 (ternary), 1, 2, 4, 8 or 16")
    return None


def load_scheme_file(path: str | Path, default_group_size: int = 128) -> QuantScheme:
    """A scheme from a JSON/YAML file: a `bitcpm_quant` block (bare or under that key) or a CANN strategy file."""
    data = read_structured_file(path, "quantization scheme file")
    if isinstance(data, dict) and "layer_strategy" in data:
        return scheme_from_strategy(data["layer_strategy"], str(path), default_group_size)
    if isinstance(data, dict) and CONFIG_KEY in data:
        data = data[CONFIG_KEY]
    return QuantScheme.from_dict(data, where=str(path))


def scheme_from_strategy(strategy: Any, where: str, default_group_size: int = 128) -> QuantScheme:
    """Map a CANN Kit `dopt_config.json`-style `layer_strategy` onto a QuantScheme.

    Each entry gives a module's weight `bit` (1.58 = ternary, 16 = keep float) and `group_size`.
    The most common setting becomes the scheme's default; other layers become exact-name overrides. lm_head is
    quantized only if its entry asks for fewer than 16 bits.
    """
    if not isinstance(strategy, dict) or not strategy:
        raise ConfigError(f"'layer_strategy' must be a non-empty mapping ({where})",
                          hint='expected {"layer_strategy": {"model.layers.0.self_attn.q_proj": '
                               '{"weight": {"bit": 1.58, "group_size": 128}}, ...}}')

    problems: list[str] = []
    resolved: dict[str, LayerQuant] = {}
    source = where  # the file (the loop below names each entry in `where`)
    for name, entry in strategy.items():
        where = f"layer_strategy[{name!r}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("weight"), dict):
            problems.append(f"{where}: needs a 'weight' mapping with 'bit' and 'group_size'")
            continue
        activations = _input_activations(entry.get("input"), where, problems)
        quant_type = _weight_quant_type(entry["weight"], where, problems)
        group_size = entry["weight"].get("group_size", default_group_size)
        is_embedding = "embed" in name or entry.get("quant_strategy") == "Quant_Embed_MinMax"
        if is_embedding and quant_type not in (None, "none"):
            problems.append(f"{where}: embedding quantization is not supported; set weight.bit to 16")
            continue
        if quant_type is not None and activations is not None:
            problems += _problems_for(quant_type, group_size, f"{where}: ")
            problems += _activation_problems(activations, quant_type, f"{where}: ")
            resolved[name] = LayerQuant(quant_type, group_size, activations=activations)
    collect(problems, ConfigError, f"invalid strategy file ({source})",
            "fix the entries named above; see the CANN Kit low-bit quantization guide for the format")

    decoder = [q for n, q in resolved.items() if q.enabled and not n.endswith("lm_head")]
    base = Counter(decoder).most_common(1)[0][0] if decoder else LayerQuant("ternary", default_group_size)
    skip = [s for s in DEFAULT_SKIP if not any(n.endswith(s) and q.enabled for n, q in resolved.items())]
    layers = {
        re.escape(name): {"quant_type": q.quant_type, "group_size": q.group_size}
                         | ({"activations": q.activations} if q.enabled else {})
        for name, q in resolved.items()
        if q != base and not (q.quant_type == "none" and any(name.endswith(s) for s in skip))
    }
    calibrated = sum(q.activations != "none" for q in resolved.values())
    unlisted = (" and in every quantized linear the file does not list (they take its most common entry's settings)"
                if base.activations != "none" else "")
    notes = (f"{source}: input.bit 8 in {calibrated} listed layer(s){unlisted} runs as int8-token activations "
             "(dynamic absmax per token); the CANN Kit's calibrated static activation scales (num_samples) are not "
             "reproduced",) if calibrated else ()
    return QuantScheme(base.quant_type, base.group_size, tuple(skip), layers, activations=base.activations,
                       notes=notes)


def _input_activations(entry: Any, where: str, problems: list[str]) -> str | None:
    """A strategy entry's `input.bit` as an activation scheme: 8 -> int8-token (the CANN Kit calibrates a static
    scale; bitcpm computes the absmax of each token), 16 or 32 (or none given) -> none."""
    bit = (entry or {}).get("bit", 16) if isinstance(entry, dict) else entry
    if bit in (16, 32, None) and not isinstance(bit, bool):
        return "none"
    if bit == 8 and not isinstance(bit, bool):
        return "int8-token"
    problems.append(f"{where}: input.bit {bit!r} is not supported; use 8 (int8 activations, per token) or 16 "
                    "(full precision)")
    return None
