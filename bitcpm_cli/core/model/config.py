"""config.json fields parsed once for everyone (config validation, GGUF export, the memory plan): RoPE blocks and
parameters (transformers 4 `rope_scaling`, 5 `rope_parameters`, flat or per layer type), head_dim, LongRoPE's
attention factor.
"""

from __future__ import annotations

import math
from typing import Any

from bitcpm_cli.core.errors import ConfigError

ROPE_KEYS = ("rope_scaling", "rope_parameters")  # transformers 4.x, 5.x


# the rope_type `rope_parameters` gives when the layer types have different RoPE blocks (no single rope to export)
PER_LAYER_ROPE = "per-layer"


def head_dim(config: dict[str, Any]) -> int:
    """The attention head width: config.json's head_dim, else hidden_size / num_attention_heads."""
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def rope_blocks(config: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """RoPE parameter blocks, each with the key it sits under: transformers 4.x `rope_scaling`, 5.x
    `rope_parameters` (flat, or one block per layer type: `rope_parameters.full_attention`, ...)."""
    blocks = []
    for key in ROPE_KEYS:
        block = config.get(key)
        if not isinstance(block, dict):
            continue
        nested = {k: v for k, v in block.items() if isinstance(v, dict)}
        if nested and not any(k in block for k in ("rope_type", "type", "long_factor", "short_factor")):
            blocks += [(f"{key}.{k}", v) for k, v in nested.items()]
        else:
            blocks.append((key, block))
    return blocks


def rope_parameters(config: dict[str, Any]) -> dict[str, Any]:
    """The rope parameters transformers uses: `rope_parameters` (transformers 5) or `rope_scaling` + `rope_theta`.

    A block per layer type counts when every layer type has the same one; where they differ the rope_type is
    PER_LAYER_ROPE (with the blocks under "blocks"), a rope type no exporter takes, so nothing is exported with a
    rope that is not the model's. A key that holds something other than a block is a ConfigError (exit 2)."""
    by_key: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    for key, block in rope_blocks(config):
        by_key.setdefault(key.split(".", 1)[0], []).append((key, block))
    rope: dict[str, Any] = {}
    for key in reversed(ROPE_KEYS):  # rope_parameters first: its values win over rope_scaling's
        value = config.get(key)
        if value and not isinstance(value, dict):
            raise ConfigError(f"config.json: {key} must be an object, not {type(value).__name__} ({str(value)[:60]})",
                              hint='restore it from the model\'s source (e.g. {"rope_type": "default"})')
        blocks = by_key.get(key) or [(key, {})]
        if any(block != blocks[0][1] for _, block in blocks[1:]):
            return {"rope_type": PER_LAYER_ROPE, "rope_theta": config.get("rope_theta", 10000.0),
                    "blocks": dict(blocks)}
        rope.update({k: v for k, v in blocks[0][1].items() if k not in rope})
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
