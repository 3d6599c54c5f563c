"""config.json validated against the weight shapes, and repaired.

Every field that the shapes of a Llama/MiniCPM-style decoder determine is derived from the tensor headers alone:
vocab_size, hidden_size, num_hidden_layers, intermediate_size, num_attention_heads, num_key_value_heads, head_dim,
tie_word_embeddings and the dtype. LongRoPE factor lists are checked (head_dim / 2 entries) but cannot be invented.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bitcpm_cli.core.errors import CheckFailed, ConfigError, InputError, QuantError
from bitcpm_cli.core.io.outputs import OutputGuard, write_text_output
from bitcpm_cli.core.model.checkpoint import TensorSpec, read_config, read_tensor_specs
from bitcpm_cli.core.model.config import head_dim, rope_blocks
from bitcpm_cli.core.model.learned_scales import (
    expected_scales,
    is_scale_name,
    scale_hint,
    scale_problems,
    stored_scale_names,
)

REPORT_SCHEMA = "bitcpm.fix-config/1"
LAYER_RE = re.compile(r"^(?P<prefix>.*?)layers\.(?P<index>\d+)\.(?P<rest>.+)$")
LAYER_TENSORS = {
    "q": "self_attn.q_proj.weight", "k": "self_attn.k_proj.weight", "v": "self_attn.v_proj.weight",
    "o": "self_attn.o_proj.weight", "gate": "mlp.gate_proj.weight", "up": "mlp.up_proj.weight",
    "down": "mlp.down_proj.weight",
}


# model types whose config class defaults tie_word_embeddings to False
UNTIED_BY_DEFAULT = {"llama", "mistral", "minicpm", "minicpm4", "qwen2", "qwen3", "mixtral", "internlm2"}
FIX_HINT = "run `bitcpm fix-config {model}` to see the report, and `bitcpm fix-config {model} --write` to repair it"


class UnsupportedArchitecture(InputError):
    """The weights are not a Llama/MiniCPM-style decoder, so their config cannot be derived."""


@dataclass
class FieldCheck:
    field: str
    config: Any  # the value in config.json; None when absent (see `present`)
    weights: Any  # the value the weights imply
    verdict: str  # "ok" | "mismatch" | "missing" | "unfixable"
    note: str = ""
    present: bool = True

    @property
    def fixable(self) -> bool:
        return self.verdict in ("mismatch", "missing")


@dataclass
class ConfigReport:
    model: str
    config_path: str
    weights_format: str
    weight_files: list[str]
    tensors: int
    parameters: int
    head_dim_evidence: str
    checks: list[FieldCheck]
    fixed_config: dict[str, Any] = field(repr=False)
    written: str | None = None
    backup: str | None = None

    @property
    def consistent(self) -> bool:
        return all(c.verdict == "ok" for c in self.checks)

    @property
    def to_fix(self) -> list[FieldCheck]:
        return [c for c in self.checks if c.fixable]

    @property
    def unfixable(self) -> list[FieldCheck]:
        return [c for c in self.checks if c.verdict == "unfixable"]

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": REPORT_SCHEMA,
            "model": self.model,
            "config": self.config_path,
            "consistent": self.consistent,
            "weights": {"format": self.weights_format, "files": self.weight_files, "tensors": self.tensors,
                        "parameters": self.parameters},
            "head_dim_evidence": self.head_dim_evidence,
            "fields": [{k: v for k, v in asdict(c).items()} for c in self.checks],
            "changes": {c.field: c.weights for c in self.to_fix},
            "unfixable": [c.field for c in self.unfixable],
            "written": self.written,
            "backup": self.backup,
        }


# ---- derivation ---------------------------------------------------------------------------------
def _factor_lengths(config: dict[str, Any]) -> list[tuple[str, int]]:
    lengths = []
    for key, block in rope_blocks(config):
        for name in ("long_factor", "short_factor"):
            if isinstance(block.get(name), list) and all(_number(v) for v in block[name]):
                lengths.append((f"{key}.{name}", len(block[name])))
    return lengths


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _rotary_factor(config: dict[str, Any]) -> tuple[Any, bool]:
    """config.json's partial_rotary_factor (1.0 when absent or null) and whether it is a number within (0, 1]."""
    factor = config.get("partial_rotary_factor")
    if factor is None:
        return 1.0, True
    return factor, _number(factor) and 0 < factor <= 1


# MiniCPM's scales: embeddings x scale_emb, residual branches x scale_depth / sqrt(layers), logits / (hidden_size /
# dim_model_base); read by the model types whose name starts with "minicpm" (transformers ignores them elsewhere)
SCALE_FIELDS = ("scale_emb", "scale_depth", "dim_model_base")
SCALE_HINT = "set it from the model's release (MiniCPM releases use scale_emb 12, scale_depth 1.4, dim_model_base 256)"


def reads_scales(config: dict[str, Any]) -> bool:
    """Whether the config's model type computes with MiniCPM's scale fields."""
    return str(config.get("model_type") or "").lower().startswith("minicpm")


def scale_field_problems(config: dict[str, Any]) -> list[str]:
    """Each MiniCPM scale field that a MiniCPM config sets to something other than a positive finite number (null
    counts as not set): `dim_model_base: 0` divides by zero, a negative or zero scale flips or erases a signal."""
    if not reads_scales(config):
        return []
    return [f"{key}: config.json says {config[key]!r}, model_type {config.get('model_type')!r} needs a positive "
            "number" for key in SCALE_FIELDS if config.get(key) is not None and not (_number(config[key])
                                                                                     and config[key] > 0)]


def require_valid_scales(config: dict[str, Any], where: str | Path) -> None:
    """ConfigError naming every invalid MiniCPM scale field of `config` (read from `where`)."""
    problems = scale_field_problems(config)
    if problems:
        raise ConfigError(f"invalid MiniCPM scale in {where}: " + problems[0], hint=SCALE_HINT,
                          problems=problems if len(problems) > 1 else ())


def _derive_head_dim(q_out: int, kv_out: int, config: dict[str, Any], override: int | None) -> tuple[int, str]:
    def fits(d: Any) -> bool:
        return _positive_int(d) and q_out % d == 0 and kv_out % d == 0

    if override is not None:
        if not fits(override):
            raise ConfigError(f"--head-dim {override} does not divide the q_proj ({q_out}) and k_proj ({kv_out}) "
                              "output sizes", hint="pick a head_dim that divides both")
        return override, "--head-dim"
    if fits(config.get("head_dim")):
        return config["head_dim"], "config head_dim divides q_proj and k_proj consistently"
    partial, valid = _rotary_factor(config)
    partial = partial if valid else 1.0
    for key, length in _factor_lengths(config):
        if fits(round(2 * length / partial)):
            return round(2 * length / partial), f"{key} has {length} entries (head_dim / 2)"
    votes = {}
    for key, out in (("num_key_value_heads", kv_out), ("num_attention_heads", q_out)):
        heads = config.get(key)
        if _positive_int(heads) and out % heads == 0 and fits(out // heads):
            votes[key] = out // heads
    if len(set(votes.values())) == 1:
        return next(iter(votes.values())), f"config {' and '.join(votes)} divide q_proj and k_proj consistently"
    g = math.gcd(q_out, kv_out)
    candidates = [d for d in range(16, min(g, 512) + 1, 16) if g % d == 0]
    raise ConfigError(
        f"cannot tell head_dim from the weights: q_proj has {q_out} outputs and k_proj {kv_out}; head_dim could be "
        + ", ".join(str(c) for c in candidates)
        + (f" (config says {config.get('head_dim')})" if "head_dim" in config else " (config has no head_dim)"),
        hint="pass --head-dim N (the model card or the original config.json tells it)",
    )


def _unsupported(specs: dict[str, TensorSpec], missing: str) -> UnsupportedArchitecture:
    sample = ", ".join(sorted(specs)[:3])
    return UnsupportedArchitecture(
        f"unsupported architecture: {missing} (tensors look like: {sample})",
        hint="fix-config understands Llama/MiniCPM-style decoders (embed_tokens, layers.N.self_attn.q_proj, "
             "layers.N.mlp.gate_proj, ...)",
    )


def derive_architecture(specs: dict[str, TensorSpec], config: dict[str, Any],
                        head_dim: int | None = None) -> tuple[dict[str, Any], str]:
    """The config fields the weights determine, and what decided head_dim."""
    embed = next((n for n in specs if n.endswith("embed_tokens.weight")), None)
    layers: dict[int, dict[str, TensorSpec]] = defaultdict(dict)
    for name, spec in specs.items():
        match = LAYER_RE.match(name)
        if match:
            layers[int(match["index"])][match["rest"]] = spec
    if embed is None:
        raise _unsupported(specs, "no '*embed_tokens.weight' tensor")
    if not layers or LAYER_TENSORS["q"] not in layers[min(layers)]:
        raise _unsupported(specs, "no 'layers.N.self_attn.q_proj.weight' tensors")

    problems = []
    first = layers[min(layers)]
    missing_kinds = [rest for rest in LAYER_TENSORS.values() if rest not in first]
    if missing_kinds:
        raise _unsupported(specs, f"layer {min(layers)} has no {', '.join(missing_kinds)}")
    expected = sorted(layers)
    if expected != list(range(len(expected))):
        gaps = sorted(set(range(max(expected) + 1)) - set(expected))
        problems.append(f"decoder layers {', '.join(map(str, gaps[:10]))} have no tensors (found {len(expected)} "
                        f"layers numbered up to {max(expected)})")
    for index, tensors in sorted(layers.items()):
        for rest in LAYER_TENSORS.values():
            if rest not in tensors:
                problems.append(f"layer {index} has no {rest}")
            elif tensors[rest].shape != first[rest].shape:
                problems.append(f"layer {index} {rest} is {list(tensors[rest].shape)}, layer {min(layers)} has "
                                f"{list(first[rest].shape)}")
    vocab, hidden = specs[embed].shape
    q_out, q_in = first[LAYER_TENSORS["q"]].shape
    kv_out = first[LAYER_TENSORS["k"]].shape[0]
    intermediate = first[LAYER_TENSORS["gate"]].shape[0]
    shape_rules = [
        (q_in == hidden, f"q_proj input {q_in} != embedding width {hidden}"),
        (first[LAYER_TENSORS["v"]].shape[0] == kv_out, "v_proj and k_proj output sizes differ"),
        (tuple(first[LAYER_TENSORS["o"]].shape) == (hidden, q_out), "o_proj is not [hidden, q_proj outputs]"),
        (tuple(first[LAYER_TENSORS["down"]].shape) == (hidden, intermediate), "down_proj is not [hidden, intermediate]"),
    ]
    problems += [message for ok, message in shape_rules if not ok]
    lm_head = next((n for n in specs if n.endswith("lm_head.weight")), None)
    if lm_head and specs[lm_head].shape != (vocab, hidden):
        problems.append(f"lm_head is {list(specs[lm_head].shape)} but embed_tokens is {[vocab, hidden]}")
    if problems:
        raise InputError("the weights are inconsistent with themselves: " + problems[0],
                         hint="the checkpoint is incomplete or mixes shards of different models",
                         problems=problems if len(problems) > 1 else ())

    hd, evidence = _derive_head_dim(q_out, kv_out, config, head_dim)
    floats = Counter()
    for name, spec in specs.items():
        # learned scales are float32 by design whatever the weights' dtype: they do not decide it
        if spec.dtype.startswith(("float", "bfloat")) and not is_scale_name(name):
            floats[spec.dtype] += spec.numel
    derived = {
        "vocab_size": vocab,
        "hidden_size": hidden,
        "num_hidden_layers": len(expected),
        "intermediate_size": intermediate,
        "num_attention_heads": q_out // hd,
        "num_key_value_heads": kv_out // hd,
        "head_dim": hd,
        "tie_word_embeddings": lm_head is None,
        "dtype": floats.most_common(1)[0][0] if floats else None,
    }
    return derived, evidence


# ---- the check ----------------------------------------------------------------------------------
def _compare(config: dict[str, Any], derived: dict[str, Any]) -> list[FieldCheck]:
    checks = []
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads",
                "num_key_value_heads"):
        present = key in config
        verdict = "missing" if not present else ("ok" if config[key] == derived[key] else "mismatch")
        checks.append(FieldCheck(key, config.get(key), derived[key], verdict, present=present))

    hd = derived["head_dim"]
    if "head_dim" in config:
        checks.append(FieldCheck("head_dim", config["head_dim"], hd, "ok" if config["head_dim"] == hd else "mismatch"))
    else:
        default = head_dim({k: derived[k] for k in ("hidden_size", "num_attention_heads")})  # transformers' default
        ok = default == hd
        checks.append(FieldCheck("head_dim", None, hd, "ok" if ok else "missing", present=False,
                                 note=f"not set; the default hidden_size / num_attention_heads = {default}"
                                      + (" matches" if ok else f" is wrong, head_dim {hd} must be written")))

    tied = derived["tie_word_embeddings"]
    note = "lm_head.weight is absent, so the output layer reuses embed_tokens" if tied else "lm_head.weight is present"
    if "tie_word_embeddings" in config:
        verdict = "ok" if bool(config["tie_word_embeddings"]) == tied else "mismatch"
        checks.append(FieldCheck("tie_word_embeddings", config["tie_word_embeddings"], tied, verdict, note))
    else:
        default_false = str(config.get("model_type", "")).lower() in UNTIED_BY_DEFAULT
        verdict = "ok" if default_false and not tied else "missing"
        checks.append(FieldCheck("tie_word_embeddings", None, tied, verdict,
                                 note + ("; not set, the model type's default (false) applies" if verdict == "ok"
                                         else "; not set, and the default may differ"), present=False))

    dtype_key = "dtype" if "dtype" in config else "torch_dtype"
    if derived["dtype"] is not None:
        if dtype_key in config:
            verdict = "ok" if config[dtype_key] == derived["dtype"] else "mismatch"
            checks.append(FieldCheck(dtype_key, config[dtype_key], derived["dtype"], verdict,
                                     "the dtype most weights are stored in"))
        else:
            checks.append(FieldCheck(dtype_key, None, derived["dtype"], "ok", "not set (loaders default to float32)",
                                     present=False))

    factor, valid = _rotary_factor(config)
    if not valid:
        checks.append(FieldCheck("partial_rotary_factor", factor, "a number within (0, 1]", "unfixable",
                                 "the fraction of head_dim that is rotated; take it from the model's release"))
        factor = 1.0
    rotary = round(hd * factor)
    for key, block in rope_blocks(config):
        for name in ("long_factor", "short_factor"):
            value = block.get(name)
            if value is not None and not (isinstance(value, list) and all(_number(v) for v in value)):
                checks.append(FieldCheck(f"{key}.{name}", value, "a list of numbers", "unfixable",
                                         "RoPE factors are a list of numbers; take the list from the model's release"))
    checks += _scale_checks(config)
    for key, length in _factor_lengths(config):
        ok = length == rotary // 2
        checks.append(FieldCheck(
            f"{key} length", length, rotary // 2, "ok" if ok else "unfixable",
            "" if ok else "RoPE factors are tuned values that cannot be derived from the weights; take the list "
                          "from the model's original release",
        ))
    return checks


def _scale_checks(config: dict[str, Any]) -> list[FieldCheck]:
    """fix-config's view of the MiniCPM scale fields: unfixable (they cannot be derived from the weights)."""
    bad = {problem.split(":", 1)[0] for problem in scale_field_problems(config)}
    return [FieldCheck(key, config[key], "a positive number", "unfixable", SCALE_HINT) for key in SCALE_FIELDS
            if key in bad]


LEARNED_SCALES_FIELD = "bitcpm_quant.learned_scales"


def _learned_scale_checks(config: dict[str, Any], specs: dict[str, TensorSpec]) -> list[FieldCheck]:
    """bitcpm_quant's learned_scales against the `*.quant_alpha` tensors (none when neither has any): each stored
    scale must be one the scheme's quantized layers need, of the shape their weight and group size give, and each
    one they need must be stored. Unfixable: the scales cannot be derived, nor the scheme they were trained with."""
    stored = stored_scale_names(specs)
    block = config.get("bitcpm_quant")
    declared = isinstance(block, dict) and block.get("learned_scales") is True
    if not stored and not declared:
        return []  # (quant, and with it torch, is imported only for a checkpoint with learned scales)
    from bitcpm_cli.core.quant import QuantScheme, plan_state_dict

    try:
        scheme = QuantScheme.from_config(config)
        targets = plan_state_dict({n: s.shape for n, s in specs.items()}, {n: s.dtype for n, s in specs.items()},
                                  scheme) if scheme else {}
        problems = scale_problems(specs, expected_scales(specs, targets))
    except (ConfigError, QuantError) as exc:
        problems = [f"bitcpm_quant does not apply to these weights: {exc.message}"]
    note = f"{len(stored)} quant_alpha tensor(s) fit the scheme" if not problems else (
        problems[0] + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else "") + "; " + scale_hint(problems[0]))
    return [FieldCheck(LEARNED_SCALES_FIELD, declared, bool(stored), "unfixable" if problems else "ok", note,
                       present=isinstance(block, dict) and "learned_scales" in block)]


ACTIVATIONS_FIELD = "bitcpm_quant.activations"
ACTIVATION_HINT = ("not fixable from the weights: choose activations whose block divides these layers' in_features "
                   "(q8_k: 256, q8_0: 32; int8-token and none have no block), or override them per layer under "
                   "bitcpm_quant.layers")
RECORD_HINT = ("not fixable from the weights: bitcpm_activations is written by `bitcpm convert`; convert the QAT "
               "checkpoint again, or remove the key to run the model with full-precision activations")


def _problem_note(problems: list[str], hint: str) -> str:
    """Every problem of an activation row, then what to do."""
    return "; ".join(problems) + f" ({hint})"


def _activation_checks(config: dict[str, Any], specs: dict[str, TensorSpec]) -> list[FieldCheck]:
    """A QAT config's activation schemes against the layers' in_features (a block must divide them), and a fused
    config's `bitcpm_activations` record against its linears (none when neither names activations). Unfixable:
    what the model was trained with cannot be derived from the weights."""
    from bitcpm_cli.core.quant.activations import FUSED_CONFIG_KEY

    checks = []
    block = config.get("bitcpm_quant")
    layers = block.get("layers") if isinstance(block, dict) else None
    overrides = layers.values() if isinstance(layers, dict) else ()
    if isinstance(block, dict) and ("activations" in block or any(isinstance(o, dict) and "activations" in o
                                                                  for o in overrides)):
        problems, summary = _scheme_activation_problems(config, specs)
        checks.append(FieldCheck(ACTIVATIONS_FIELD, summary, "blocks that divide every quantized layer's in_features",
                                 "unfixable" if problems else "ok",
                                 _problem_note(problems, ACTIVATION_HINT) if problems else ""))
    if FUSED_CONFIG_KEY in config:
        problems = _record_problems(config[FUSED_CONFIG_KEY], specs)
        record = config[FUSED_CONFIG_KEY]
        shown = (", ".join(f"{scheme}: {len(names) if isinstance(names, list) else names!r}"
                           for scheme, names in record.items()) if isinstance(record, dict) else record)
        checks.append(FieldCheck(FUSED_CONFIG_KEY, shown, "quantizing schemes of linear layers",
                                 "unfixable" if problems else "ok",
                                 _problem_note(problems, RECORD_HINT) if problems else ""))
    return checks


def _scheme_activation_problems(config: dict[str, Any], specs: dict[str, TensorSpec]) -> tuple[list[str], Any]:
    """Every problem with bitcpm_quant's activation schemes on these weights, and their summary (or the raw value of
    a scheme that does not parse)."""
    from bitcpm_cli.core.quant.activations import block_problem
    from bitcpm_cli.core.quant.scheme import ACTIVATION_BLOCKS, QuantScheme, is_embedding_name

    try:
        scheme = QuantScheme.from_config(config)
    except ConfigError as exc:
        return exc.problems or [exc.message], config["bitcpm_quant"].get("activations", "none")
    misfits: dict[tuple[str, int], list[str]] = defaultdict(list)  # (scheme, in_features) -> the layers
    for name, spec in specs.items():  # the linears `plan_state_dict` quantizes
        module = name.removesuffix(".weight")
        if (name.endswith(".weight") and len(spec.shape) == 2 and spec.dtype.startswith(("float", "bfloat"))
                and not is_embedding_name(module)):
            activations = scheme.for_module(module).activations
            if block_problem(activations, spec.shape[1], module) is not None:
                misfits[activations, spec.shape[1]].append(module)
    problems = [f"activations {activations} quantize blocks of {ACTIVATION_BLOCKS[activations]} input values, which "
                f"do not divide in_features {columns} of {len(names)} linear(s): {', '.join(sorted(names))}"
                for (activations, columns), names in sorted(misfits.items())]
    return problems, scheme.activation_summary()


def _record_problems(record: Any, specs: dict[str, TensorSpec]) -> list[str]:
    """Every problem of a fused config's `bitcpm_activations` record against the tensor headers."""
    from bitcpm_cli.core.quant.activations import FUSED_CONFIG_KEY, read_fused_record

    try:
        read_fused_record(record, {n: s.shape for n, s in specs.items()}, FUSED_CONFIG_KEY)
    except ConfigError as exc:
        return exc.problems or [exc.message]
    return []


def check_config(model_dir: str | Path, head_dim: int | None = None) -> ConfigReport:
    """Compare a model directory's config.json with its weights (headers only) and prepare the fixed config."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise InputError(f"not a model directory ({model_dir})",
                         hint="pass the folder holding config.json and the weight files")
    config = read_config(model_dir)
    files, specs = read_tensor_specs(model_dir)
    derived, evidence = derive_architecture(specs, config, head_dim)
    checks = _compare(config, derived) + _learned_scale_checks(config, specs) + _activation_checks(config, specs)
    fixed = dict(config)
    for check in checks:
        if check.fixable:
            fixed[check.field] = check.weights
    return ConfigReport(
        model=str(model_dir),
        config_path=str(model_dir / "config.json"),
        weights_format=files.format,
        weight_files=[f.name for f in files.files],
        tensors=len(specs),
        parameters=sum(s.numel for s in specs.values()),
        head_dim_evidence=evidence,
        checks=checks,
        fixed_config=fixed,
    )


def _dump(config: dict[str, Any]) -> str:
    return json.dumps(config, indent=2, ensure_ascii=False) + "\n"


def _free_backup_path(config_path: Path) -> Path:
    backup = config_path.with_name(config_path.name + ".bak")
    n = 1
    while backup.exists():
        backup = config_path.with_name(f"{config_path.name}.bak.{n}")
        n += 1
    return backup


def write_fixed_config(report: ConfigReport, output: str | Path | None = None, overwrite: bool = False) -> ConfigReport:
    """Write the repaired config: in place (keeping a byte-identical backup) or to `output`, through the output
    guard (never into the model folder or over an existing file without `overwrite`)."""
    config_path = Path(report.config_path)
    if output is not None:
        if Path(output).exists() and Path(output).resolve() == config_path.resolve():
            raise InputError(f"--output is the model's own config.json ({output})",
                             hint="use --write to repair it in place (a backup is kept), or choose another path")
        write_text_output(_dump(report.fixed_config), output, [report.model], overwrite=overwrite)
        report.written = str(output)
        return report
    if not report.to_fix:
        return report
    weights = [Path(report.model) / name for name in report.weight_files]
    guard = OutputGuard(config_path, weights, overwrite=True, kind="file", what="config.json")
    staging = guard.claim()
    backup = _free_backup_path(config_path)
    try:
        shutil.copy2(config_path, backup)
        staging.write_text(_dump(report.fixed_config), encoding="utf-8")
        guard.commit()
    except BaseException as exc:
        backup.unlink(missing_ok=True)
        guard.abort(exc)
        raise
    report.written, report.backup = str(config_path), str(backup)
    return report


def require_consistent_config(model_dir: str | Path) -> ConfigReport | None:
    """For commands that load a model: stop with the fix-config hint instead of a size-mismatch traceback.

    Returns None for architectures this check does not understand (the command then loads as usual); invalid MiniCPM
    scale fields are refused for every architecture.
    """
    require_valid_scales(read_config(model_dir), Path(model_dir) / "config.json")
    try:
        report = check_config(model_dir)
    except UnsupportedArchitecture:
        return None
    # The loaders check learned scales and activation schemes themselves (learned_scales.py, quant/qat.py,
    # quant/activations.py), naming the layer and the fix.
    bad = [c for c in report.to_fix + report.unfixable
           if c.field not in (LEARNED_SCALES_FIELD, ACTIVATIONS_FIELD, "bitcpm_activations")]
    if bad:
        details = [f"{c.field}: config.json says {c.config if c.present else '(not set)'}, the weights say "
                   f"{c.weights}" for c in bad]
        raise ConfigError(f"config.json disagrees with the weights ({report.config_path}): " + details[0]
                          + (f" (and {len(details) - 1} more)" if len(details) > 1 else ""),
                          hint=FIX_HINT.format(model=model_dir), problems=details if len(details) > 1 else ())
    return report


def require_fixed(report: ConfigReport) -> None:
    """`fix-config`'s verdict: exit 1 (CheckFailed) while config.json still disagrees with the weights (the fields
    left to fix, none once the repair was written, and those no repair can derive); the report is printed first."""
    remaining = report.unfixable if report.written else report.to_fix + report.unfixable
    if not remaining:
        return
    hint = ("run again with --write to repair config.json (a backup is kept), or --output FILE to write the "
            "repair elsewhere" if report.to_fix and not report.written else
            "these fields cannot be derived from the weights: set them from the model's source")
    raise CheckFailed(f"config.json disagrees with the weights in {len(remaining)} field(s): "
                      + ", ".join(check.field for check in remaining), hint=hint)
