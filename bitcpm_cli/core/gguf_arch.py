"""Which llama.cpp architecture a checkpoint is written as, in the style of llama.cpp's `convert_hf_to_gguf.py`:
one entry per `model_type`, each writing the hyperparameters its llama.cpp architecture reads, and refusing (exit 1,
naming the parameter) what that architecture would ignore, so a GGUF is never a different model in silence.

- `llama` (and `mistral` without a sliding window): llama.cpp's `llama`. With LongRoPE (the real BitCPM4-1B's
  rope) it is written as llama.cpp's `minicpm` with neutral scales, the llama.cpp architecture that carries both
  LongRoPE factor lists (its `llama` carries one).
- `minicpm`: llama.cpp's `minicpm`, with `scale_emb` (embedding scale), `scale_depth / sqrt(layers)` (residual
  scale) and `hidden_size / dim_model_base` (logits divided by it), as llama.cpp's converter writes them.

RoPE: default; `linear`; `longrope` (short / long factor lists as llama.cpp's rope factor tensors, the attention
factor as `rope.scaling.attn_factor`, computed the way transformers computes it). Anything else is refused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bitcpm_cli.core.errors import CheckFailed, InputError

@dataclass
class GgufArchitecture:
    """The chosen llama.cpp architecture and what it writes for one config."""

    name: str  # llama.cpp's architecture: "llama" | "minicpm"
    config: dict[str, Any]
    rope: dict[str, Any] = field(default_factory=dict)  # the resolved rope parameters (rope_type, factors...)
    notes: list[str] = field(default_factory=list)

    @property
    def heads(self) -> int:
        return self.config["num_attention_heads"]

    @property
    def kv_heads(self) -> int:
        return self.config.get("num_key_value_heads") or self.heads

    @property
    def head_dim(self) -> int:
        return _head_dim(self.config)

    @property
    def longrope(self) -> bool:
        return self.rope.get("rope_type") == "longrope"

    def prepare(self, name: str, weight: Any) -> Any:
        """The row order llama.cpp expects for q_proj / k_proj (rotary halves interleaved), as its converter does."""
        if name.endswith("q_proj.weight"):
            return _permute(weight, self.heads)
        if name.endswith("k_proj.weight"):
            return _permute(weight, self.kv_heads)
        return weight

    def metadata(self, writer: Any) -> None:
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
        import gguf

        if self.rope.get("rope_type") == "linear":
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(float(self.rope["factor"]))
        if self.longrope:
            writer.add_rope_scaling_type(gguf.RopeScalingType.LONGROPE)
            writer.add_rope_scaling_orig_ctx_len(int(self.rope["original_max_position_embeddings"]))
            writer.add_rope_scaling_attn_factors(float(longrope_attention_factor(config, self.rope)))
        if self.name == "minicpm":
            scale_emb, scale_depth, base = (config.get("scale_emb", 1), config.get("scale_depth"),
                                            config.get("dim_model_base"))
            writer.add_embedding_scale(float(scale_emb))
            writer.add_residual_scale(1.0 if scale_depth is None else
                                      float(scale_depth / math.sqrt(config["num_hidden_layers"])))
            writer.add_logit_scale(1.0 if base is None else float(config["hidden_size"] / base))

    def extra_tensors(self) -> list[tuple[str, np.ndarray]]:
        """Tensors llama.cpp reads that the checkpoint does not hold: the LongRoPE factor lists."""
        if not self.longrope:
            return []
        return [("rope_factors_long.weight", np.asarray(self.rope["long_factor"], dtype=np.float32)),
                ("rope_factors_short.weight", np.asarray(self.rope["short_factor"], dtype=np.float32))]


def _head_dim(config: dict[str, Any]) -> int:
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def _permute(weight: Any, heads: int) -> Any:
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def rope_parameters(config: dict[str, Any]) -> dict[str, Any]:
    """The rope parameters transformers uses: `rope_parameters` (transformers 5) or `rope_scaling` + `rope_theta`."""
    rope = dict(config.get("rope_parameters") or {})
    scaling = config.get("rope_scaling") or {}
    rope.update({k: v for k, v in scaling.items() if k not in rope})
    if "type" in rope and "rope_type" not in rope:
        rope["rope_type"] = rope.pop("type")
    rope.setdefault("rope_type", "default")
    rope.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    if rope["rope_type"] == "longrope":
        rope.setdefault("original_max_position_embeddings", config.get("original_max_position_embeddings")
                        or config.get("max_position_embeddings"))
    return rope


def longrope_attention_factor(config: dict[str, Any], rope: dict[str, Any]) -> float:
    """transformers' LongRoPE attention factor: the given one, else sqrt(1 + ln(factor) / ln(original length))."""
    if rope.get("attention_factor") is not None:
        return float(rope["attention_factor"])
    original = rope["original_max_position_embeddings"]
    factor = rope.get("factor") or config.get("max_position_embeddings", original) / original
    return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))


def select_architecture(config: dict[str, Any]) -> GgufArchitecture:
    """The llama.cpp architecture for this config, or CheckFailed naming every parameter it could not honour."""
    model_type = config.get("model_type") or "llama"
    if model_type not in ("llama", "mistral", "minicpm"):
        raise InputError(f"GGUF export supports model_type llama, mistral and minicpm, not {model_type!r}",
                         hint="export a Llama- or MiniCPM-style decoder")
    rope = rope_parameters(config)
    problems = []
    if config.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act {config['hidden_act']!r}: llama.cpp's llama / minicpm use silu")
    if model_type == "mistral" and config.get("sliding_window") is not None:
        problems.append(f"sliding_window {config['sliding_window']}: llama.cpp's llama architecture attends to the "
                        "whole context")
    if rope["rope_type"] not in ("default", "linear", "longrope"):
        problems.append(f"rope type {rope['rope_type']!r}: only default, linear and longrope rope are exported")
    head_dim = _head_dim(config)
    if config.get("partial_rotary_factor", rope.get("partial_rotary_factor", 1.0)) != 1.0:
        problems.append("partial_rotary_factor: llama.cpp's llama / minicpm rotate the whole head")
    if rope["rope_type"] == "longrope":
        for key in ("short_factor", "long_factor"):
            if len(rope.get(key) or ()) != head_dim // 2:
                problems.append(f"rope {key}: needs {head_dim // 2} values (head_dim / 2), has "
                                f"{len(rope.get(key) or ())}")
    if problems:
        raise CheckFailed(f"cannot export model_type {model_type!r} exactly: " + problems[0],
                          hint="llama.cpp would compute a different model; nothing was written",
                          problems=problems if len(problems) > 1 else ())
    notes = []
    if model_type == "minicpm":
        name = "minicpm"
    else:
        name = "minicpm" if rope["rope_type"] == "longrope" else "llama"
        ignored = [k for k in ("scale_emb", "scale_depth", "dim_model_base") if config.get(k) not in (None, 1, 1.0)]
        if ignored:
            notes.append(f"config.json sets {', '.join(ignored)} but model_type {model_type!r} does not use them "
                         "(transformers ignores them too): set model_type minicpm if the model was trained with them")
        if name == "minicpm":
            notes.append("LongRoPE: written as llama.cpp's minicpm architecture with neutral scales (its llama "
                         "architecture cannot hold both factor lists)")
    return GgufArchitecture(name, config, rope, notes)
