"""`finetuning_type: lora` with the adapter inside the fake quantizer: a targeted linear computes
`Q(W + (alpha/r) B A) x`, so training sees the ternary model it becomes; `final/` is the merged QAT checkpoint.

Built on peft (the optional extra `lora`): its LoraConfig (saved as `adapter_config.json`), its target matching
(`check_target_module_exists`), its injection, freezing, adapter saving, merge_and_unload and the Trainer's adapter
resume. bitcpm writes the layer's forward and merge (`QuantizedLoraLinear`, a subclass of peft's `lora.Linear`
registered through `LoraConfig._register_custom_module`): peft's own Linear adds `B A x` beside the base layer's
output, which for a QATLinear would be a side adapter next to the quantized weight, not inside the quantizer, and its
merge adds `B A` to the weight in the weight's dtype. Also bitcpm's: `lora_target: all` (LLaMA-Factory's meaning), the
marker subclass of LoraConfig, and the resume checks (peft loads mismatched adapters with a warning only).

What holds:
- QATLinear base: forward = `F.linear(base.quantized_input(x), base.fused_weight(lora=(A, B, alpha/r)), bias)`
  (the input quantized by the base layer's activation scheme; STE to the input, A and B; a learned scale
  `quant_alpha` stays frozen at its stored / initial value, as every base parameter: only the adapters train).
- plain nn.Linear base (a layer the scheme leaves unquantized): forward = `F.linear(x, W + (alpha/r) B @ A, bias)`
  with the sum computed in float32, so its merge is exact too.
- merge (`merge_lora`): every base weight becomes the very tensor its forward used as latent (`latent_weight(lora)`
  in float32, resp. the float32 sum above) and the whole model float32, so the merged model's float32 forward equals
  the trained float32 forward bit for bit. (A bf16 checkpoint trains under bf16 autocast with bf16 fused weights;
  its final/ holds the same float32 latents, whose float32 fused weights are the same codes times unrounded scales.)
- `adapter_config.json` carries `bitcpm_inside_quantizer: true`. Stock peft ignores that key (with a warning) and
  would load the adapter as a side adapter beside the weight: only bitcpm reads it right. bitcpm refuses to resume
  from an adapter without it.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import nn

from bitcpm_cli.core.errors import ConfigError, InputError
from bitcpm_cli.core.io.readers import read_json_file
from bitcpm_cli.core.quant import QATLinear
from bitcpm_cli.core.training.callbacks import latest_complete_checkpoint
from bitcpm_cli.core.training.recipe import lora_setting_problems

MARKER = "bitcpm_inside_quantizer"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# LLaMA-Factory's `lora_target: all` leaves these out (the output embedding / LM head of the common architectures)
OUTPUT_NAMES = ("lm_head", "output_layer", "embed_out")
PEFT_HINT = "pip install 'bitcpm[lora]'"


def require_peft() -> Any:
    """The peft package, or InputError saying how to get it (it is the optional extra `lora`)."""
    try:
        import peft
    except ImportError:
        raise InputError("finetuning_type lora needs peft", hint=PEFT_HINT) from None
    return peft


def uses_lora(config: Any) -> bool:
    return getattr(config, "finetuning_type", "full") == "lora"


def lora_scaling(config: Any) -> tuple[int, float]:
    """(rank, lora_alpha); lora_alpha unset is 2 x rank (LLaMA-Factory's default). The scaling is alpha / rank."""
    rank = int(config.lora_rank)
    alpha = getattr(config, "lora_alpha", None)
    return rank, float(alpha) if alpha is not None else float(2 * rank)


def _requested(config: Any) -> list[str]:
    target = getattr(config, "lora_target", "all")
    items = target.split(",") if isinstance(target, str) else list(target or [])
    return [str(item).strip() for item in items if str(item).strip()]


def lora_targets(module_names: Iterable[str], quantized_names: Iterable[str], config: Any, *,
                 output_embedding: str | None = None) -> list[str]:
    """The linear modules (full names, in the given order) that get an adapter, by LLaMA-Factory's `lora_target`:
    `all` is every linear but the output embedding (`lm_head` & co, and `output_embedding` when given); otherwise
    comma-separated names matched as peft's `target_modules` list matches them (a full name, or a suffix after a
    dot). Pure (names only). A name matching no linear is a ConfigError listing the available ones."""
    require_peft()
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    names = list(module_names)
    requested = _requested(config)
    if not requested:
        raise ConfigError("lora_target: empty", hint="lora_target: all, or comma-separated module names (q_proj,v_proj)")
    if requested == ["all"]:
        excluded = set(OUTPUT_NAMES)
        return [n for n in names if n.rsplit(".", 1)[-1] not in excluded and n != output_embedding]
    per_item = {item: LoraConfig(target_modules=[item]) for item in requested}
    matched = {item: {n for n in names if check_target_module_exists(c, n)} for item, c in per_item.items()}
    targets = [n for n in names if any(n in found for found in matched.values())]
    unmatched = [item for item, found in matched.items() if not found]
    if unmatched:
        available = _available(names, set(quantized_names))
        raise ConfigError(f"lora_target: {', '.join(unmatched)} names no linear module of this model",
                          hint=f"use all, or some of: {available}")
    return targets


def _available(names: Sequence[str], quantized: set[str]) -> str:
    """The distinct short names of the linears, the unquantized ones marked."""
    short: dict[str, bool] = {}
    for name in names:
        leaf = name.rsplit(".", 1)[-1]
        short[leaf] = short.get(leaf, False) or name not in quantized
    return ", ".join(f"{leaf} (not quantized)" if plain and quantized else leaf for leaf, plain in short.items())


def lora_parameter_count(shapes_by_module: Mapping[str, Sequence[int]], config: Any,
                         quantized_names: Iterable[str] = ()) -> int:
    """How many parameters the adapters train: r * (in + out) per targeted linear. `shapes_by_module` maps a
    linear's module name to its weight shape [out, in]."""
    rank, _ = lora_scaling(config)
    targets = lora_targets(shapes_by_module, quantized_names, config)
    return sum(rank * (int(shapes_by_module[n][0]) + int(shapes_by_module[n][1])) for n in targets)


@functools.cache
def _classes() -> tuple[type, type]:
    """(BitcpmLoraConfig, QuantizedLoraLinear), built once peft is imported (it is an optional dependency)."""
    require_peft()
    from peft import LoraConfig
    from peft.tuners.lora.layer import Linear as LoraLinear
    from peft.tuners.tuners_utils import check_adapters_to_merge

    @dataclass
    class BitcpmLoraConfig(LoraConfig):
        """peft's LoraConfig plus the marker saying the adapter lives inside bitcpm's fake quantizer."""

        bitcpm_inside_quantizer: bool = field(default=True, metadata={
            "help": "bitcpm: the adapter is added to the latent weight before the fake quantizer; stock peft "
                    "ignores this and would run it as a side adapter"})

    class QuantizedLoraLinear(LoraLinear):
        """peft's lora.Linear whose adapter is added to the weight, inside the quantizer (see the module doc)."""

        def _parts(self) -> tuple[torch.Tensor, torch.Tensor, float]:
            active = [name for name in self.active_adapters if name in self.lora_A]
            if len(active) != 1:
                raise ConfigError(f"bitcpm's LoRA inside the quantizer runs one adapter at a time, got {active}",
                                  hint="activate exactly one adapter")
            name = active[0]
            return self.lora_A[name].weight, self.lora_B[name].weight, float(self.scaling[name])

        def lora_weight(self) -> torch.Tensor:
            """The weight the forward multiplies by (with autograd to A and B)."""
            base = self.get_base_layer()
            a, b, scaling = self._parts()
            if isinstance(base, QATLinear):
                return base.fused_weight(lora=(a, b, scaling))
            return plain_latent(base.weight, a, b, scaling)

        @torch.no_grad()
        def merged_latent(self) -> torch.Tensor:
            """The latent weight a merged checkpoint stores: float32, the forward's own latent."""
            base = self.get_base_layer()
            a, b, scaling = self._parts()
            if isinstance(base, QATLinear):
                return base.latent_weight(lora=(a, b, scaling))
            return plain_latent(base.weight, a, b, scaling)

        def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            self._check_forward_args(x, *args, **kwargs)
            if self.disable_adapters or self.merged or not any(n in self.lora_A for n in self.active_adapters):
                return self.base_layer(x, *args, **kwargs)
            base = self.get_base_layer()
            if isinstance(base, QATLinear):  # the base layer's activation scheme quantizes the input
                x = base.quantized_input(x)
            return nn.functional.linear(x, self.lora_weight(), base.bias)

        def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
            if not check_adapters_to_merge(self, adapter_names):
                return
            base = self.get_base_layer()
            base.weight = nn.Parameter(self.merged_latent(), requires_grad=base.weight.requires_grad)
            self.merged_adapters.extend(n for n in self.active_adapters if n in self.lora_A)

        def unmerge(self) -> None:
            raise ConfigError("bitcpm's LoRA inside the quantizer cannot be unmerged",
                              hint="merge once, for final/ (merge_lora)")

    return BitcpmLoraConfig, QuantizedLoraLinear


def plain_latent(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """W + scaling * B @ A, in float32 (the forward's weight for an unquantized linear, and its merge)."""
    return weight.float() + scaling * (b.float() @ a.float())


def quantized_lora_linear_class() -> type:
    return _classes()[1]


def lora_config_class() -> type:
    return _classes()[0]


def _linear_names(model: nn.Module) -> tuple[list[str], list[str], str | None]:
    """(every linear's name, the quantized ones', the output embedding's name or None)."""
    get = getattr(model, "get_output_embeddings", None)
    output = get() if callable(get) else None
    names, quantized, output_name = [], [], None
    for name, module in model.named_modules():
        if module is output and output is not None:
            output_name = name
        if isinstance(module, nn.Linear):
            names.append(name)
            if isinstance(module, QATLinear):
                quantized.append(name)
    return names, quantized, output_name


def _refuse_tied(model: nn.Module, targets: list[str]) -> None:
    """A linear whose weight is the input embedding's cannot take a merged adapter without changing the embedding."""
    get = getattr(model, "get_input_embeddings", None)
    tied = getattr(get(), "weight", None) if callable(get) else None
    modules = dict(model.named_modules())
    bad = [n for n in targets if tied is not None and modules[n].weight is tied]
    if bad:
        raise ConfigError(f"lora_target: {', '.join(bad)} shares its weight with the input embeddings; a merged "
                          "adapter would change the embeddings too", hint="leave it out of lora_target")


def add_lora(model: nn.Module, config: Any, notes: list[str] | None = None) -> nn.Module:
    """The model wrapped by peft with an adapter inside the quantizer on every `lora_target` linear; everything
    else is frozen (peft), learned scales included. Returns the PeftModel."""
    problems = lora_setting_problems(config)
    if problems:
        raise ConfigError(problems[0], problems=problems[1:], hint="fix the LoRA settings named above")
    require_peft()
    from peft import get_peft_model

    names, quantized, output_name = _linear_names(model)
    targets = lora_targets(names, quantized, config, output_embedding=output_name)
    if not targets:
        raise ConfigError("lora_target: no linear module to adapt", hint="lora_target: all, or name some")
    _refuse_tied(model, targets)
    if getattr(config, "resume", False) and getattr(config, "output_dir", None):
        checkpoint = latest_complete_checkpoint(Path(config.output_dir))  # the one the Trainer resumes from
        if checkpoint is not None:
            check_resume_checkpoint(checkpoint, config, targets)
    rank, alpha = lora_scaling(config)
    config_class, layer_class = _classes()
    lora_config = config_class(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=targets, bias="none")
    lora_config._register_custom_module({nn.Linear: layer_class})
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        torch.manual_seed(int(getattr(config, "seed", 42)))  # peft draws A at random: from the run's seed
        # peft asks the model whether it checkpoints activations under transformers' deprecated name; nothing for
        # the user to act on
        warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*", category=FutureWarning)
        peft_model = get_peft_model(model, lora_config)
    if notes is not None:
        plain = [n for n in targets if n not in set(quantized)]
        notes.append(f"LoRA r={rank} alpha={alpha:g} inside the quantizer on {len(targets)} linears"
                     + (f" ({len(plain)} of them not quantized: plain LoRA, merged exactly)" if plain else "")
                     + "; every other parameter is frozen (learned scales keep their initial value)")
    return peft_model


SHARDED_REFUSAL = ("finetuning_type lora does not run with sharded weights (ZeRO-3, FSDP): the adapter's A and B "
                   "are read inside the base layer's forward, where ZeRO-3 has not gathered them, and the merge for "
                   "final/ needs whole weights")
SHARDED_HINT = "use DDP or ZeRO-1/2 (LoRA's gradients and optimizer states are small; the frozen model is held once)"


def check_lora_strategy(kind: str) -> None:
    """Before anything loads: LoRA inside the quantizer runs with one process, DDP and ZeRO-1/2, not sharded weights."""
    if kind in ("zero3", "fsdp"):
        raise ConfigError(SHARDED_REFUSAL, hint=SHARDED_HINT)


def is_lora_model(model: Any) -> bool:
    """A peft model carrying bitcpm's in-quantizer adapter."""
    configs = getattr(model, "peft_config", None)
    return isinstance(configs, dict) and any(getattr(c, MARKER, False) for c in configs.values())


@torch.no_grad()
def merge_lora(model: Any) -> nn.Module:
    """In place: every adapter merged into its base linear (float32 latent = the trained forward's latent), the peft
    wrapper removed, every parameter float32 (a frozen bf16 one upcast exactly: one dtype for the whole checkpoint,
    so that no loader rounds a merged latent to the checkpoint's 16-bit dtype). Returns the plain model (QATLinear /
    nn.Linear modules, config.json's bitcpm_quant kept)."""
    if not is_lora_model(model):
        raise ConfigError("not a model with bitcpm's LoRA inside the quantizer", hint="use add_lora")
    return model.merge_and_unload().float()


def check_resume_checkpoint(checkpoint: Path, config: Any, targets: Sequence[str] | None = None) -> None:
    """A checkpoint to resume from must match the run's finetuning_type: a LoRA run needs bitcpm's in-quantizer
    adapter (the marker, the same rank / alpha, and, once known, the same targets); any other run needs no adapter.
    InputError naming the file otherwise."""
    adapter_config = Path(checkpoint) / ADAPTER_CONFIG
    hint = "resume with the LoRA settings the run was started with (see bitcpm_train_config.yaml beside it)"
    if not uses_lora(config):
        if adapter_config.exists():
            raise InputError(f"--resume: {checkpoint} holds a LoRA adapter ({ADAPTER_CONFIG}) but finetuning_type "
                             f"is {getattr(config, 'finetuning_type', 'full')}", hint="set finetuning_type: lora")
        return
    if not adapter_config.is_file() or not (Path(checkpoint) / ADAPTER_WEIGHTS).is_file():
        raise InputError(f"--resume: {checkpoint} holds no LoRA adapter ({ADAPTER_CONFIG}, {ADAPTER_WEIGHTS}) but "
                         "finetuning_type is lora", hint="resume with the finetuning_type the run was started with")
    saved = read_json_file(adapter_config, ADAPTER_CONFIG)
    if not isinstance(saved, dict) or saved.get(MARKER) is not True:
        raise InputError(f"--resume: {adapter_config} is not bitcpm's adapter inside the quantizer (no "
                         f'"{MARKER}": true); a plain peft side adapter cannot be continued as one',
                         hint="start a new run, or resume a run bitcpm trained with finetuning_type lora")
    rank, alpha = lora_scaling(config)
    problems = [f"{key} is {saved.get(key)} in {adapter_config} but {value} in this run"
                for key, value in (("r", rank), ("lora_alpha", alpha)) if saved.get(key) != value]
    if targets is not None and set(saved.get("target_modules") or ()) != set(targets):
        problems.append(f"target_modules in {adapter_config} differ from this run's lora_target")
    if problems:
        raise InputError(f"--resume: {problems[0]}", problems=problems[1:], hint=hint)
