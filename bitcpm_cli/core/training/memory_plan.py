"""Will a training run fit? A per-rank memory plan from config.json and the settings alone (no weights loaded).

Bytes per parameter, as transformers' Trainer and DeepSpeed hold them:
- weights and gradients: fp32 (4 B), or 2 B under DeepSpeed with bf16 (Trainer's own bf16 is autocast: fp32 weights);
- AdamW: two fp32 states (8 B), plus an fp32 master copy (4 B) when DeepSpeed keeps 16-bit weights;
- the QAT fake quantizer caches one fused weight per quantized linear (same dtype as the weight) unless weights are
  sharded (ZeRO-3, FSDP), where it is computed per forward from the gathered layer;
- sharding: ZeRO-1 splits optimizer states over the ranks, ZeRO-2 also gradients, ZeRO-3 / FSDP also weights.
Activations per micro-batch are an estimate for a Llama-style decoder layer (the attention inputs and outputs, the
MLP's intermediate tensors, the attention scores as eager attention materialises them: an upper bound where
flash attention runs) plus the logits with their fp32 loss; with gradient
checkpointing only each layer's input is kept, plus one layer being recomputed.
A run fits when the plan is at most 90 % of the device memory (the rest for the framework, the data and the
allocator); CPU memory is shared by the ranks on one machine.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from bitcpm_cli.core.errors import InputError
from bitcpm_cli.core.model.config import head_dim
from bitcpm_cli.core.training.distributed import shards

FIT_FRACTION = 0.9
GIB = 2**30


@dataclass(frozen=True)
class Shape:
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    tied: bool

    @classmethod
    def from_config(cls, path: Path) -> "Shape":
        from bitcpm_cli.core.model.checkpoint import read_config

        values = read_config(path.parent)  # the careful reader: bad JSON, depth, huge numbers are exit 2
        missing = [k for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                               "intermediate_size") if not (isinstance(values.get(k), int)
                                                            and not isinstance(values.get(k), bool) and values[k] > 0)]
        if missing:
            raise InputError(f"{path}: no {', '.join(missing)}; the memory plan needs a decoder's shape",
                             hint="fix config.json (see `bitcpm fix-config`)")
        heads = values["num_attention_heads"]
        return cls(values["vocab_size"], values["hidden_size"], values["num_hidden_layers"], heads,
                   values.get("num_key_value_heads") or heads, head_dim(values),
                   values["intermediate_size"], bool(values.get("tie_word_embeddings", False)))

    def linear_parameters(self) -> int:
        """The decoder layers' linears: what the fake quantizer targets (embeddings and lm_head stay full)."""
        attention = 2 * self.hidden * self.heads * self.head_dim + 2 * self.hidden * self.kv_heads * self.head_dim
        return self.layers * (attention + 3 * self.hidden * self.intermediate)

    def parameters(self) -> int:
        embeddings = self.vocab * self.hidden * (1 if self.tied else 2)
        return embeddings + self.linear_parameters() + (2 * self.layers + 1) * self.hidden


@dataclass
class Settings:
    """What the plan depends on."""

    batch_size: int
    sequence: int
    bf16: bool
    gradient_checkpointing: bool
    kind: str  # single, ddp, zero1, zero2, zero3, fsdp
    world: int
    quantized: bool

    def shards(self, part: str) -> int:
        return shards(self.kind, self.world, part)

    def describe(self) -> str:
        names = {"single": "one process", "ddp": "DDP", "zero1": "ZeRO-1", "zero2": "ZeRO-2", "zero3": "ZeRO-3",
                 "fsdp": "FSDP"}
        return names[self.kind] if self.world == 1 and self.kind == "single" else f"{names[self.kind]} over {self.world} ranks"


@dataclass
class MemoryPlan:
    parts: dict[str, int]  # bytes per rank
    strategy: str
    parameters: int
    available: int | None  # bytes one rank may use
    available_from: str
    suggestions: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    @property
    def fits(self) -> bool:
        return self.available is None or self.total <= FIT_FRACTION * self.available

    def lines(self) -> list[str]:
        rows = [f"{name}: {size / GIB:.2f} GiB" for name, size in self.parts.items()]
        rows.append(f"total per rank: {self.total / GIB:.2f} GiB ({self.strategy}, "
                    f"{human_count(self.parameters)} parameters)")
        if self.available is not None:
            rows.append(f"available per rank: {self.available / GIB:.2f} GiB ({self.available_from}); a run fits "
                        f"within {FIT_FRACTION:.0%} of it")
        return rows

    def to_dict(self) -> dict[str, Any]:
        return {"parts": self.parts, "total": self.total, "strategy": self.strategy, "parameters": self.parameters,
                "available": self.available, "available_from": self.available_from, "fits": self.fits,
                "suggestions": self.suggestions}


def human_count(count: int) -> str:
    """A parameter count in the unit that shows it: 2.62 M, 1.24 B, 950 (never "0.00 B")."""
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(count) >= size:
            return f"{count / size:.2f} {unit}"
    return str(count)


def estimate(shape: Shape, settings: Settings) -> dict[str, int]:
    """Bytes per rank, by part."""
    params = shape.parameters()
    sixteen_bit = settings.bf16 and settings.kind.startswith("zero")
    weight_bytes = 2 if sixteen_bit else 4
    optimizer_bytes = 8 + (4 if sixteen_bit else 0)
    parts = {
        "weights": params * weight_bytes // settings.shards("weights"),
        "gradients": params * weight_bytes // settings.shards("gradients"),
        "optimizer states (AdamW)": params * optimizer_bytes // settings.shards("optimizer"),
    }
    if settings.quantized:
        cached = shape.linear_parameters() if settings.shards("weights") == 1 else \
            shape.linear_parameters() // shape.layers  # one gathered layer at a time
        parts["fused weights (QAT)"] = cached * weight_bytes
    element = 2 if settings.bf16 else 4
    tokens = settings.batch_size * settings.sequence
    scores = settings.batch_size * shape.heads * settings.sequence**2 * element * 2
    per_layer = tokens * (16 * shape.hidden + 4 * shape.intermediate) * element + scores
    kept = tokens * shape.hidden * element * shape.layers + per_layer if settings.gradient_checkpointing \
        else per_layer * shape.layers
    logits = tokens * shape.vocab * 4 * 3  # fp32 logits, log-softmax and their gradient
    parts["activations per micro-batch"] = kept + logits
    return parts


def device_memory(device: Any, limit_gb: float | None) -> tuple[int | None, str]:
    """Bytes of one device (for CPU: the machine's RAM, which its ranks share), and where the figure comes from."""
    if limit_gb is not None:
        return int(limit_gb * GIB), "max_memory_gb"
    from bitcpm_cli.core.runtime.device import probe_npu
    from bitcpm_cli.core.runtime.environment import list_devices

    label = "cpu" if device.type == "cpu" else str(device)
    entry = next((d for d in list_devices(probe_npu() if device.type == "npu" else None) if d["device"] == label),
                 None)
    if entry is None or entry["memory_bytes"] is None:
        return None, f"{label}: memory size unknown"
    return entry["memory_bytes"], f"{label} {'RAM' if device.type == 'cpu' else 'memory'}"


def alternatives(shape: Shape, settings: Settings, available: int, unit: str) -> list[str]:
    """Setting changes (single ones first, then combined) under which the plan fits in `available` bytes a rank.
    More ZeRO-3 ranks help only with memory of their own: more accelerators, or (on CPU) more machines."""
    changes = []
    if not settings.gradient_checkpointing:
        changes.append(("gradient_checkpointing=true", {"gradient_checkpointing": True}))
    if not settings.bf16:
        changes.append(("bf16=true", {"bf16": True}))
    if settings.batch_size > 1:
        changes.append(("batch_size=1 (raise grad_accum to keep the global batch)", {"batch_size": 1}))
    if settings.kind not in ("zero3", "fsdp"):
        for ranks in (2, 4, 8, 16, 32, 64):
            changes.append((f"deepspeed=configs/deepspeed/zero3.json over {ranks} {unit}",
                            {"kind": "zero3", "world": ranks}))
    fits = lambda s: sum(estimate(shape, s).values()) <= FIT_FRACTION * available  # noqa: E731
    found = []
    for label, change in changes:
        if fits(replace(settings, **change)):
            found.append(label)
            if "kind" in change:
                break  # the fewest ranks that fit
    if found:
        return found
    combined, labels = settings, []
    for label, change in changes:
        if combined.kind == "zero3" and "kind" in change:
            continue
        trial = replace(combined, **change)
        if "kind" in change and not fits(trial):
            continue
        combined = trial
        labels.append(label)
        if fits(combined):
            return [" + ".join(labels)]
    return []


def plan_memory(model_dir: Path, config: Any, kind: str, world: int, device: Any) -> MemoryPlan:
    """The plan for a training config (TrainConfig or SftConfig) and strategy, before anything is loaded."""
    shape = Shape.from_config(model_dir / "config.json")
    sequence = getattr(config, "max_length", None) or config.block_size
    settings = Settings(config.batch_size, sequence, config.bf16, config.gradient_checkpointing, kind, world,
                        config.quant_type != "none")
    memory, source = device_memory(device, config.max_memory_gb)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world) or 1)

    if memory is not None and device.type == "cpu" and local > 1:
        memory //= local  # the ranks on one machine share its RAM
        source += f" shared by {local} ranks"
    plan = MemoryPlan(estimate(shape, settings), settings.describe(), shape.parameters(), memory, source)
    if not plan.fits:
        plan.suggestions = alternatives(shape, settings, memory, "machines" if device.type == "cpu" else "ranks")
    return plan
