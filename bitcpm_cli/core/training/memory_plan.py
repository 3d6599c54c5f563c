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
checkpointing only each layer's input is kept, plus one layer being recomputed. Fake-quantized activations (a scheme
with `activations`) add the quantized inputs the linears save in place of shared ones (quantized_input_copies).
A run fits when the plan is at most 90 % of the device memory (the rest for the framework, the data and the
allocator); CPU memory is shared by the ranks on one machine.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from math import prod
from pathlib import Path
from typing import Any

from bitcpm_cli.core.errors import InputError
from bitcpm_cli.core.model.config import head_dim
from bitcpm_cli.core.training.distributed import shards
from bitcpm_cli.core.training.selection import Choice, trainable_names

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
    attention_biases: tuple[str, ...] = ()  # the attention projections with a bias (q_proj, k_proj, ...)
    mlp_biases: tuple[str, ...] = ()  # the MLP projections with a bias

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
                   values["intermediate_size"], bool(values.get("tie_word_embeddings", False)), *biases(values))

    def parameter_table(self, scheme: Any = None) -> dict[str, tuple[int, ...]]:
        """Every parameter of a Llama / MiniCPM-style causal LM of this shape, name -> shape, in named_parameters
        order (tied: no lm_head.weight), plus `<linear>.quant_alpha` [rows, groups] for the quantized linears of a
        learned-scales `scheme` (a QuantScheme), as `prepare` adds them."""
        from bitcpm_cli.core.quant import scale_shape

        attention, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        linears = {"self_attn.q_proj": (attention, self.hidden), "self_attn.k_proj": (kv, self.hidden),
                   "self_attn.v_proj": (kv, self.hidden), "self_attn.o_proj": (self.hidden, attention),
                   "mlp.gate_proj": (self.intermediate, self.hidden), "mlp.up_proj": (self.intermediate, self.hidden),
                   "mlp.down_proj": (self.hidden, self.intermediate)}
        table: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (self.vocab, self.hidden)}
        for layer in range(self.layers):
            for suffix, shape in linears.items():
                module = f"model.layers.{layer}.{suffix}"
                table[module + ".weight"] = shape
                if suffix.split(".")[1] in (self.attention_biases + self.mlp_biases):
                    table[module + ".bias"] = shape[:1]
                spec = scheme.for_module(module) if scheme is not None else None
                if spec is not None and spec.enabled and spec.learned:
                    table[module + ".quant_alpha"] = scale_shape(shape, spec.group_size)
            for norm in ("input_layernorm", "post_attention_layernorm"):
                table[f"model.layers.{layer}.{norm}.weight"] = (self.hidden,)
        table["model.norm.weight"] = (self.hidden,)
        if not self.tied:
            table["lm_head.weight"] = (self.vocab, self.hidden)
        return table

    def linear_parameters(self) -> int:
        """The decoder layers' linears: what the fake quantizer targets (embeddings and lm_head stay full)."""
        attention = 2 * self.hidden * self.heads * self.head_dim + 2 * self.hidden * self.kv_heads * self.head_dim
        return self.layers * (attention + 3 * self.hidden * self.intermediate)

    def parameters(self) -> int:
        embeddings = self.vocab * self.hidden * (1 if self.tied else 2)
        return embeddings + self.linear_parameters() + (2 * self.layers + 1) * self.hidden + self.bias_parameters()

    def bias_parameters(self) -> int:
        """The linears' biases (attention_bias / mlp_bias / Qwen2's q, k, v biases), all layers."""
        rows = {"q_proj": self.heads * self.head_dim, "k_proj": self.kv_heads * self.head_dim,
                "v_proj": self.kv_heads * self.head_dim, "o_proj": self.hidden, "gate_proj": self.intermediate,
                "up_proj": self.intermediate, "down_proj": self.hidden}
        return self.layers * sum(rows[name] for name in self.attention_biases + self.mlp_biases)


ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


def biases(values: dict[str, Any]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(attention projections with a bias, MLP projections with a bias), as transformers builds them: Llama /
    MiniCPM's `attention_bias` (q, k, v, o) and `mlp_bias` (gate, up, down); Qwen2 always has q, k, v biases."""
    attention = ATTENTION if values.get("attention_bias") is True else \
        ATTENTION[:3] if values.get("model_type") == "qwen2" else ()
    return attention, MLP if values.get("mlp_bias") is True else ()


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
    choice: Choice = Choice()  # what trains (full, freeze, lora, trainable_keys)
    scheme: Any = None  # the QuantScheme trained with (which linears are quantized, learned scales); None: default
    frozen_bytes: int = 4  # bytes per element of a frozen parameter: the checkpoint's dtype
    teacher_parameters: int = 0  # a KD teacher's parameters (held in bf16 with bf16, else float32)

    def shards(self, part: str) -> int:
        return shards(self.kind, self.world, part)

    def describe(self) -> str:
        names = {"single": "one process", "ddp": "DDP", "zero1": "ZeRO-1", "zero2": "ZeRO-2", "zero3": "ZeRO-3",
                 "fsdp": "FSDP"}
        where = names[self.kind] if self.world == 1 and self.kind == "single" else \
            f"{names[self.kind]} over {self.world} ranks"
        return where if not self.choice.selective else f"{where}, {self.choice.describe()}"


@dataclass(frozen=True)
class Counts:
    """Parameter elements by role, from the synthetic name table and the selection."""

    trainable: int  # base-model parameters that train (fp32, with gradients and AdamW states)
    frozen: int  # held at the checkpoint's dtype, no gradient, no state
    adapters: int  # LoRA A and B (trainable)
    fused_trainable: int  # quantized linear weights that train (their fused copy is cached at the training dtype)
    fused_frozen: int  # quantized linear weights that are frozen (their fused copy is cached at the checkpoint's)

    @property
    def total(self) -> int:
        return self.trainable + self.frozen + self.adapters


def count(shape: Shape, settings: Settings) -> Counts:
    """What trains and what is frozen, by name (core.training.selection on Shape.parameter_table)."""
    from bitcpm_cli.core.quant import QuantScheme

    scheme = (settings.scheme or QuantScheme()) if settings.quantized else None
    table = shape.parameter_table(scheme)
    chosen = trainable_names(table, settings.choice, "the planned model")
    numel = {name: prod(dims) for name, dims in table.items()}
    trainable = sum(numel[n] for n in chosen)
    quantized = [n for n in table if n.endswith(".weight") and len(table[n]) == 2 and scheme is not None
                 and scheme.for_module(n.removesuffix(".weight")).enabled and ".layers." in n]
    adapters = lora_adapter_parameters(table, quantized, settings.choice) \
        if settings.choice.finetuning_type == "lora" else 0
    return Counts(trainable, sum(numel.values()) - trainable, adapters,
                  sum(numel[n] for n in quantized if n in chosen), sum(numel[n] for n in quantized if n not in chosen))


def lora_adapter_parameters(table: dict[str, tuple[int, ...]], quantized: list[str], choice: Choice) -> int:
    """LoRA's A [r, in] and B [out, r] on every targeted linear (core.training.lora decides which)."""
    from bitcpm_cli.core.training.lora import lora_parameter_count

    linears = {n.removesuffix(".weight"): dims for n, dims in table.items() if n.endswith(".weight")
               and len(dims) == 2 and "embed" not in n}
    return lora_parameter_count(linears, choice, [n.removesuffix(".weight") for n in quantized])


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
    """Bytes per rank, by part: exactly what trains gets fp32 weights, gradients and AdamW states; frozen parameters
    only their weights at the checkpoint's dtype."""
    counts = count(shape, settings)
    trains = counts.trainable + counts.adapters
    sixteen_bit = settings.bf16 and settings.kind.startswith("zero")
    weight_bytes = 2 if sixteen_bit else 4
    frozen_bytes = min(settings.frozen_bytes, weight_bytes)  # DeepSpeed's bf16 engine casts the whole model
    optimizer_bytes = 8 + (4 if sixteen_bit else 0)
    parts = {
        "weights": trains * weight_bytes // settings.shards("weights"),
        "gradients": trains * weight_bytes // settings.shards("gradients"),
        "optimizer states (AdamW)": trains * optimizer_bytes // settings.shards("optimizer"),
    }
    if counts.frozen:
        parts["frozen weights"] = counts.frozen * frozen_bytes // settings.shards("weights")
    if settings.quantized:
        cached = counts.fused_trainable * weight_bytes + counts.fused_frozen * frozen_bytes
        parts["fused weights (QAT)"] = cached if settings.shards("weights") == 1 else \
            cached // shape.layers  # one gathered layer at a time
    if settings.teacher_parameters:
        parts["teacher weights"] = settings.teacher_parameters * (2 if settings.bf16 else 4)
    element = 2 if settings.bf16 else 4
    tokens = settings.batch_size * settings.sequence
    scores = settings.batch_size * shape.heads * settings.sequence**2 * element * 2
    per_layer = tokens * (16 * shape.hidden + 4 * shape.intermediate) * element + scores
    kept = tokens * shape.hidden * element * shape.layers + per_layer if settings.gradient_checkpointing \
        else per_layer * shape.layers
    logits = tokens * shape.vocab * 4 * 3  # fp32 logits, log-softmax and their gradient
    if settings.teacher_parameters:
        logits += tokens * shape.vocab * 4 * 2  # the teacher's logits and their fp32 softmax / difference
    parts["activations per micro-batch"] = kept + logits
    if settings.quantized and quantizes_activations(settings.scheme):
        copies = quantized_input_copies(shape, settings)
        parts["quantized activations (QAT)"] = copies * (1 if settings.gradient_checkpointing else shape.layers)
    return parts


def quantizes_activations(scheme: Any) -> bool:
    """Whether a scheme fake-quantizes the input of any quantized linear (globally or in a per-layer override)."""
    return scheme is not None and (scheme.activations != "none" or any(
        override.get("activations", "none") != "none" for override in scheme.layers.values()))


def quantized_input_copies(shape: Shape, settings: Settings) -> int:
    """Bytes one decoder layer keeps for backward beyond the float path when activations are fake-quantized (an
    upper bound: every linear of the layer quantized). Each linear saves its own quantized input: in float32, q/k/v
    no longer share one saved input (2 more hidden-size copies), nor gate/up (1 more), and o_proj's input is saved
    beside the attention output SDPA keeps (attention-size); under bf16 autocast (Trainer's bf16) every linear saves
    its own bf16 cast already, so only o_proj's copy is new; DeepSpeed's bf16 (16-bit weights, no autocast) is the
    float32 case at 2 bytes. Measured with saved-tensor hooks on a Llama layer."""
    tokens = settings.batch_size * settings.sequence
    attention = shape.heads * shape.head_dim
    if settings.bf16 and not settings.kind.startswith("zero"):
        per_token = attention * 2
    else:
        per_token = (3 * shape.hidden + attention) * (2 if settings.bf16 else 4)
    return tokens * per_token


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
    if settings.kind not in ("zero3", "fsdp") and not refused_when_sharded(settings):
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
    found += [label for label, change in light_modes(settings) if fits(replace(settings, **change))]
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


def refused_when_sharded(settings: Settings) -> bool:
    """Whether the run uses a mode that check_modes refuses under ZeRO-3 / FSDP (freeze, lora, trainable_keys,
    learned scales): then no ZeRO-3 alternative is suggested."""
    learned = settings.quantized and settings.scheme is not None and settings.scheme.learned_scales
    return settings.choice.selective or bool(learned)


def light_modes(settings: Settings) -> list[tuple[str, dict[str, Any]]]:
    """The training modes that train less than everything, as setting changes (none under ZeRO-3 / FSDP, which
    refuse them); each names bf16=true too where frozen 16-bit weights need autocast."""
    if settings.choice.selective or settings.kind in ("zero3", "fsdp"):
        return []
    autocast = " bf16=true" if settings.frozen_bytes == 2 and not settings.bf16 else ""
    bf16 = {"bf16": True} if autocast else {}
    modes = []
    scheme = settings.scheme
    if settings.quantized and (scheme is None or scheme.quant_type == "ternary"):
        from bitcpm_cli.core.quant import QuantScheme

        learned = (scheme or QuantScheme()).replace(learned_scales=True)
        modes.append((f"trainable_keys=[quant_alpha,norm] learned_scales=true{autocast}",
                      {"choice": Choice(trainable_keys=("quant_alpha", "norm")), "scheme": learned, **bf16}))
    modes.append((f"finetuning_type=lora{autocast}", {"choice": Choice(finetuning_type="lora"), **bf16}))
    modes.append((f"finetuning_type=freeze{autocast}", {"choice": Choice(finetuning_type="freeze"), **bf16}))
    return modes


DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def checkpoint_dtype(config: dict[str, Any]) -> str:
    """The dtype a checkpoint's weights are stored in (config.json's torch_dtype / dtype; float32 when unstated):
    what frozen parameters are held in."""
    value = config.get("torch_dtype") or config.get("dtype")
    return value if value in DTYPE_BYTES else "float32"


def plan_memory(model_dir: Path, config: Any, kind: str, world: int, device: Any, scheme: Any = None) -> MemoryPlan:
    """The plan for a training config (TrainConfig or SftConfig) and strategy, before anything is loaded. `scheme`:
    the QuantScheme the run trains with (default: the checkpoint's, or ternary, with the config's learned_scales)."""
    from bitcpm_cli.core.model.checkpoint import read_config
    from bitcpm_cli.core.quant import QuantScheme

    shape = Shape.from_config(model_dir / "config.json")
    values = read_config(model_dir)
    quantized = config.quant_type != "none"
    if quantized and scheme is None:
        scheme = QuantScheme.from_config(values) or QuantScheme()
        if getattr(config, "learned_scales", None):
            scheme = scheme.replace(learned_scales=True)
    teacher = getattr(config, "teacher", None)
    sequence = getattr(config, "max_length", None) or config.block_size
    settings = Settings(config.batch_size, sequence, config.bf16, config.gradient_checkpointing, kind, world,
                        quantized, Choice.from_config(config), scheme, DTYPE_BYTES[checkpoint_dtype(values)],
                        Shape.from_config(Path(teacher) / "config.json").parameters() if teacher else 0)
    memory, source = device_memory(device, config.max_memory_gb)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world) or 1)

    if memory is not None and device.type == "cpu" and local > 1:
        memory //= local  # the ranks on one machine share its RAM
        source += f" shared by {local} ranks"
    plan = MemoryPlan(estimate(shape, settings), settings.describe(), count(shape, settings).total, memory, source)
    if not plan.fits:
        plan.suggestions = alternatives(shape, settings, memory, "machines" if device.type == "cpu" else "ranks")
    return plan


# The family's shapes, for the README's table. 1B: the BitCPM4-CANN-1B weights (adaptation report). 3B: the config
# the 1B repository shipped (a 3B-class MiniCPM4 shape; the 3B's own config is not in the seeds). 8B: MiniCPM4-8B's
# published shape. Released checkpoints are bf16.
REFERENCE_SHAPES = {
    "1b": Shape(vocab=73448, hidden=2048, layers=28, heads=16, kv_heads=2, head_dim=128, intermediate=6144,
                tied=False),
    "3b": Shape(vocab=73448, hidden=2560, layers=32, heads=32, kv_heads=2, head_dim=128, intermediate=10240,
                tied=False),
    "8b": Shape(vocab=73448, hidden=4096, layers=32, heads=32, kv_heads=2, head_dim=128, intermediate=16384,
                tied=False),
}
REFERENCE_MODES = {
    "full": {},
    "trainable_keys [quant_alpha, norm] + learned scales": {"choice": Choice(trainable_keys=("quant_alpha", "norm")),
                                                            "learned": True},
    "freeze (last 2 layers)": {"choice": Choice(finetuning_type="freeze")},
    "lora r=16 (every quantized linear)": {"choice": Choice(finetuning_type="lora", lora_rank=16)},
    "lora r=16 + MSE teacher": {"choice": Choice(finetuning_type="lora", lora_rank=16), "teacher": True},
}


def reference_plan(shape: str, mode: str, block_size: int = 512, batch_size: int = 1, kind: str = "single",
                   world: int = 1, group_size: int = 128) -> dict[str, int]:
    """Bytes per rank, by part plus "total", for one of REFERENCE_MODES at one of REFERENCE_SHAPES: a bf16
    checkpoint (frozen parts held in bf16), bf16 autocast, ternary at `group_size`, one micro-batch of
    `block_size` tokens (the README's "Training with less memory" table)."""
    from bitcpm_cli.core.quant import QuantScheme

    dims, change = REFERENCE_SHAPES[shape], REFERENCE_MODES[mode]
    scheme = QuantScheme(group_size=group_size).replace(learned_scales=bool(change.get("learned")))
    settings = Settings(batch_size, block_size, True, False, kind, world, True, change.get("choice", Choice()),
                        scheme, 2, dims.parameters() if change.get("teacher") else 0)
    parts = estimate(dims, settings)
    return {**parts, "total": sum(parts.values())}
