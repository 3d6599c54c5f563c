"""Which llama.cpp architecture a checkpoint is written as, in the style of llama.cpp's `convert_hf_to_gguf.py`:
one registered class per llama.cpp architecture bitcpm writes (`@register("llama")`, `@register("minicpm")`), each
declaring the configs it takes (by `model_type`), writing the hyperparameters its llama.cpp architecture reads,
preparing the tensors as llama.cpp expects them and adding the ones it needs, and refusing (exit 1, naming every
parameter) what that architecture would ignore, so a GGUF is never a different model in silence.

- `llama` takes `llama` and `mistral` (without a sliding window): llama.cpp's `llama`.
- `minicpm` takes `minicpm`, with `scale_emb` (embedding scale), `scale_depth / sqrt(layers)` (residual scale) and
  `hidden_size / dim_model_base` (logits divided by it), as llama.cpp's converter writes them; and a `llama` /
  `mistral` config with LongRoPE (the real BitCPM4-1B's rope), the llama.cpp architecture that carries both LongRoPE
  factor lists (its `llama` carries one).

RoPE (shared by both, in `GgufArchitecture`): default; `linear`; `longrope` (short / long factor lists as llama.cpp's
rope factor tensors, the attention factor as `rope.scaling.attn_factor`, computed the way transformers computes it).
Anything else is refused, and so is a per-layer-type rope whose layer types differ.

A new architecture is one class here: `@register("<llama.cpp architecture>")`, a subclass of `GgufArchitecture`
with `model_types` (the configs it owns), and `claims` (configs another one owns that it takes), `metadata`,
`prepare`, `extra_tensors`, `problems` or `config_notes` where it differs from the base.
"""

from __future__ import annotations

import math
from typing import Any, Callable, ClassVar

import numpy as np

from bitcpm_cli.core.errors import CheckFailed, ConfigError, InputError
from bitcpm_cli.core.model.config import head_dim, longrope_attention_factor, rope_parameters
from bitcpm_cli.core.model.config_check import SCALE_FIELDS as MINICPM_SCALES
from bitcpm_cli.core.model.config_check import require_valid_scales

ARCHITECTURES: dict[str, type[GgufArchitecture]] = {}  # llama.cpp architecture name -> its class, in order


def register(name: str) -> Callable[[type[GgufArchitecture]], type[GgufArchitecture]]:
    """Class decorator: the class writes llama.cpp's architecture `name` for the configs it declares."""

    def add(cls: type[GgufArchitecture]) -> type[GgufArchitecture]:
        owned = {t: other.name for other in ARCHITECTURES.values() for t in other.model_types}
        taken = [f"{t} (by {owned[t]})" for t in cls.model_types if t in owned]
        if name in ARCHITECTURES or taken:
            raise ValueError(f"GGUF architecture {name!r} is registered twice or takes a model_type already "
                             f"taken: {', '.join(taken) or name}")
        cls.name = name
        ARCHITECTURES[name] = cls
        return cls

    return add


class GgufArchitecture:
    """What the registered llama.cpp architectures share: the Llama hyperparameters, RoPE, the q / k row order and the
    refusals. One instance is the chosen architecture for one config."""

    name: ClassVar[str] = ""  # llama.cpp's architecture, set by @register
    model_types: ClassVar[tuple[str, ...]] = ()  # the config model_types this architecture owns
    rope_types: ClassVar[tuple[str, ...]] = ("default", "linear", "longrope")
    # config model_types whose transformers model honours sliding_window (neither llama.cpp architecture does)
    sliding_window_types: ClassVar[tuple[str, ...]] = ("mistral",)

    def __init__(self, config: dict[str, Any], rope: dict[str, Any] | None = None,
                 model_type: str | None = None) -> None:
        self.config = config
        self.model_type = model_type or config.get("model_type") or "llama"
        self.rope = rope_parameters(config) if rope is None else rope  # resolved: rope_type, factors...
        self.notes: list[str] = []

    @classmethod
    def claims(cls, model_type: str, rope: dict[str, Any]) -> bool:
        """Whether this architecture takes a config that another one owns (by its model_type and rope)."""
        return False

    @property
    def heads(self) -> int:
        return self.config["num_attention_heads"]

    @property
    def kv_heads(self) -> int:
        return self.config.get("num_key_value_heads") or self.heads

    @property
    def head_dim(self) -> int:
        return head_dim(self.config)

    @property
    def longrope(self) -> bool:
        return self.rope.get("rope_type") == "longrope"

    # ---- refusals and notes ----
    def problems(self) -> list[str]:
        """Every parameter of the config that llama.cpp would not compute as transformers does."""
        config, rope, problems = self.config, self.rope, []
        every = "llama.cpp's " + " / ".join(ARCHITECTURES)  # what none of the registered architectures computes
        if config.get("hidden_act", "silu") != "silu":
            problems.append(f"hidden_act {config['hidden_act']!r}: {every} use silu")
        if self.model_type in self.sliding_window_types and config.get("sliding_window") is not None:
            problems.append(f"sliding_window {config['sliding_window']}: llama.cpp's llama architecture attends to "
                            "the whole context")
        if rope["rope_type"] not in self.rope_types:
            problems.append(f"rope type {rope['rope_type']!r}: only default, linear and longrope rope are exported")
        if config.get("partial_rotary_factor", rope.get("partial_rotary_factor", 1.0)) != 1.0:
            problems.append(f"partial_rotary_factor: {every} rotate the whole head")
        if rope["rope_type"] == "longrope":
            for key in ("short_factor", "long_factor"):
                if len(rope.get(key) or ()) != self.head_dim // 2:
                    problems.append(f"rope {key}: needs {self.head_dim // 2} values (head_dim / 2), has "
                                    f"{len(rope.get(key) or ())}")
        return problems

    def check(self) -> None:
        """CheckFailed naming every parameter this architecture could not honour."""
        problems = self.problems()
        if problems:
            raise CheckFailed(f"cannot export model_type {self.model_type!r} exactly: " + problems[0],
                              hint="llama.cpp would compute a different model; nothing was written",
                              problems=problems if len(problems) > 1 else ())

    def config_notes(self) -> list[str]:
        """What the report says about how this config is written."""
        return []

    # ---- what is written ----
    def metadata(self, writer: Any) -> None:
        """The hyperparameters, as gguf-py `add_*` calls on `writer` (their order is the file's)."""
        import gguf

        config = self.config
        context = config.get("max_position_embeddings", 2048)
        if self.longrope:  # llama.cpp switches to the long factors once its context exceeds the original length
            context = min(context, self.rope["original_max_position_embeddings"])
        writer.add_context_length(context)
        writer.add_embedding_length(config["hidden_size"])
        writer.add_block_count(config["num_hidden_layers"])
        writer.add_feed_forward_length(config["intermediate_size"])
        writer.add_head_count(self.heads)
        writer.add_head_count_kv(self.kv_heads)
        writer.add_rope_dimension_count(self.head_dim)
        writer.add_key_length(self.head_dim)
        writer.add_value_length(self.head_dim)
        writer.add_layer_norm_rms_eps(config.get("rms_norm_eps", 1e-6))
        writer.add_rope_freq_base(float(self.rope.get("rope_theta", 10000.0)))
        writer.add_vocab_size(config["vocab_size"])
        if self.rope.get("rope_type") == "linear":
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(float(self.rope["factor"]))
        if self.longrope:
            writer.add_rope_scaling_type(gguf.RopeScalingType.LONGROPE)
            writer.add_rope_scaling_orig_ctx_len(int(self.rope["original_max_position_embeddings"]))
            writer.add_rope_scaling_attn_factors(float(longrope_attention_factor(config, self.rope)))

    def prepare(self, name: str, weight: Any) -> Any:
        """The row order llama.cpp expects for q_proj / k_proj (rotary halves interleaved), as its converter does."""
        if name.endswith("q_proj.weight"):
            return _permute(weight, self.heads)
        if name.endswith("k_proj.weight"):
            return _permute(weight, self.kv_heads)
        return weight

    def extra_tensors(self) -> list[tuple[str, np.ndarray]]:
        """Tensors llama.cpp reads that the checkpoint does not hold: the LongRoPE factor lists."""
        if not self.longrope:
            return []
        return [("rope_factors_long.weight", np.asarray(self.rope["long_factor"], dtype=np.float32)),
                ("rope_factors_short.weight", np.asarray(self.rope["short_factor"], dtype=np.float32))]


def _permute(weight: Any, heads: int) -> Any:
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _unused_scales(config: dict[str, Any], model_type: str) -> list[str]:
    """The note for a config that sets MiniCPM's scales under a model_type that does not read them."""
    ignored = [k for k in MINICPM_SCALES if config.get(k) not in (None, 1, 1.0)]
    if not ignored:
        return []
    return [(f"config.json sets {', '.join(ignored)} but model_type {model_type!r} does not use them (transformers "
             "ignores them too, so they are written as 1.0): set model_type minicpm if the model was trained with "
             "them")]


@register("llama")
class LlamaArchitecture(GgufArchitecture):
    """llama.cpp's `llama`: Llama and Mistral (without a sliding window) decoders."""

    model_types = ("llama", "mistral")

    def config_notes(self) -> list[str]:
        return _unused_scales(self.config, self.model_type)


@register("minicpm")
class MiniCPMArchitecture(GgufArchitecture):
    """llama.cpp's `minicpm`: MiniCPM with its three scales, and Llama / Mistral with LongRoPE (llama.cpp's `llama`
    cannot hold both factor lists)."""

    model_types = ("minicpm",)

    @classmethod
    def claims(cls, model_type: str, rope: dict[str, Any]) -> bool:
        return model_type in LlamaArchitecture.model_types and rope["rope_type"] == "longrope"

    def check(self) -> None:
        """A `minicpm` config must set its three scales (ConfigError naming the missing ones, exit 2) before the
        refusals every architecture shares: MiniCPM's own modeling code defaults each to 1 (residual x
        1 / sqrt(layers), logits / hidden_size) and llama.cpp's converter refuses such a config, so no value bitcpm
        could write is the one the model was trained with."""
        if self.model_type in self.model_types:
            require_valid_scales(self.config, "config.json")
            missing = [key for key in MINICPM_SCALES if self.config.get(key) is None]
            if missing:
                raise ConfigError(f"config.json (model_type {self.model_type!r}) does not set {_listing(missing)}: "
                                  "GGUF export cannot tell the scales the model was trained with",
                                  hint="set scale_emb, scale_depth and dim_model_base from the model's release "
                                       "(MiniCPM's own code would use 1 for each, which is rarely what was trained), "
                                       "or model_type llama for a model without MiniCPM's scales")
        super().check()

    def config_notes(self) -> list[str]:
        if self.model_type in self.model_types:
            return []
        return _unused_scales(self.config, self.model_type) + [
            ("LongRoPE: written as llama.cpp's minicpm architecture with neutral scales (its llama architecture "
             "cannot hold both factor lists)")]

    def metadata(self, writer: Any) -> None:
        """The shared hyperparameters and MiniCPM's three scales: the config's own for a `minicpm` config (check()
        made sure all three are set), 1.0 each for a Llama / Mistral config taken for its LongRoPE (transformers'
        Llama ignores scale_emb / scale_depth / dim_model_base, so the GGUF must too)."""
        super().metadata(writer)
        config = self.config
        if self.model_type not in self.model_types:
            scale_emb, residual, logit = 1.0, 1.0, 1.0
        else:
            scale_emb = float(config["scale_emb"])
            residual = float(config["scale_depth"] / math.sqrt(config["num_hidden_layers"]))
            logit = float(config["hidden_size"] / config["dim_model_base"])
        writer.add_embedding_scale(scale_emb)
        writer.add_residual_scale(residual)
        writer.add_logit_scale(logit)


def _listing(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def select_architecture(config: dict[str, Any]) -> GgufArchitecture:
    """The llama.cpp architecture for this config: the registered class that claims it, else the one that owns its
    model_type; InputError for a model_type none takes, CheckFailed naming every parameter it could not honour."""
    model_type = config.get("model_type") or "llama"
    owners = {t: cls for cls in ARCHITECTURES.values() for t in cls.model_types}
    if model_type not in owners:
        raise InputError(f"GGUF export supports model_type {_listing(list(owners))}, not {model_type!r}",
                         hint="export a Llama- or MiniCPM-style decoder")
    rope = rope_parameters(config)
    chosen = next((cls for cls in ARCHITECTURES.values() if cls.claims(model_type, rope)), owners[model_type])
    arch = chosen(config, rope, model_type)
    arch.check()
    arch.notes = arch.config_notes()
    return arch
