"""QAT modules: swap a causal LM's linears for fake-quantized ones, and fuse them back."""

from __future__ import annotations

import torch
from torch import nn

from bitcpm_cli.core.errors import QuantError, collect
from bitcpm_cli.core.quant.functional import check_groupable, fake_quantize
from bitcpm_cli.core.quant.scheme import CONFIG_KEY, LayerQuant, QuantScheme

_optimizer_steps = 0
_step_hook = None


def _count_optimizer_step(optimizer, args, kwargs) -> None:
    global _optimizer_steps
    _optimizer_steps += 1


def optimizer_steps() -> int:
    """How many optimizer steps (of any torch optimizer, DeepSpeed's ZeRO ones included) have run in this process."""
    return _optimizer_steps


def _watch_optimizer_steps() -> None:
    """Fused optimizers (Trainer's default adamw_torch_fused) update weights without bumping their version
    counter, so every optimizer step, of any optimizer, also invalidates the cached fused weights."""
    global _step_hook
    if _step_hook is None:
        from torch.optim.optimizer import register_optimizer_step_post_hook

        _step_hook = register_optimizer_step_post_hook(_count_optimizer_step)


class _STEFromFused(torch.autograd.Function):
    """Forward: a precomputed fused weight. Backward: the gradient goes to the latent weight unchanged."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, fused: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return fused.view_as(fused)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):  # type: ignore[override]
        return grad_output, None


class QATLinear(nn.Linear):
    """nn.Linear whose forward sees the fake-quantized weight (STE backward).

    Parameter names are those of nn.Linear, so state dicts stay loadable by stock transformers. The fused weight is
    computed once per change of the latent weight (an optimizer step, an in-place write, new storage), not once per
    micro-batch: gradient accumulation and activation recomputation reuse it.
    """

    quant: LayerQuant
    quant_name: str
    cache_fused = True  # False under weight sharding (see fused_weight)

    def fused_weight(self) -> torch.Tensor:
        weight = self.weight
        if not self.cache_fused:
            # Sharded weights (ZeRO-3, FSDP): whole only inside forward (gathered by the wrapper's hooks), sharded
            # again afterwards. Quantize the gathered weight every time and keep no full-size copy between forwards.
            with torch.no_grad():
                fused = fake_quantize(weight, self.quant, name=self.quant_name)
            return _STEFromFused.apply(weight, fused) if torch.is_grad_enabled() and weight.requires_grad else fused
        key = (weight.data_ptr(), weight._version, _optimizer_steps, weight.dtype, weight.device)
        if getattr(self, "_fused_key", None) != key:
            with torch.no_grad():
                self._fused = fake_quantize(weight, self.quant, name=self.quant_name)
            self._fused_key = key
        if torch.is_grad_enabled() and weight.requires_grad:
            return _STEFromFused.apply(weight, self._fused)
        return self._fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.fused_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, quant_type={self.quant.quant_type}, group_size={self.quant.group_size}"


def _input_embedding_weight(model: nn.Module) -> torch.Tensor | None:
    get = getattr(model, "get_input_embeddings", None)
    embedding = get() if callable(get) else None
    return getattr(embedding, "weight", None)


def _targets(candidates, scheme: QuantScheme, what: str) -> dict[str, LayerQuant]:
    """From (key, module name, shape, problem or None) candidates: the quantized ones, or one error listing every
    candidate that cannot be quantized."""
    targets: dict[str, LayerQuant] = {}
    problems: list[str] = []
    for key, module, shape, problem in candidates:
        spec = scheme.for_module(module)
        if not spec.enabled:
            continue
        if problem is None:
            try:
                check_groupable(shape, spec.group_size, module)
            except QuantError as exc:
                problem = f"{exc.message}; {exc.hint}"
        if problem is None:
            targets[key] = spec
        else:
            problems.append(problem)
    collect(problems, QuantError, f"the quantization scheme does not fit this {what}",
            "change group_size, add per-layer overrides, or skip the layers named above")
    return targets


def plan(model: nn.Module, scheme: QuantScheme) -> dict[str, LayerQuant]:
    """Which linears `prepare` would quantize, and how; raises one error listing every layer that cannot be."""
    tied = _input_embedding_weight(model)

    def candidates():
        for name, module in model.named_modules():
            if type(module) is nn.Linear or isinstance(module, QATLinear):
                problem = None
                if tied is not None and module.weight is tied:
                    problem = (f"{name}: its weight is tied to the input embeddings, which stay in full precision; "
                               f"keep {name} in modules_to_not_convert or untie the embeddings")
                yield name, name, tuple(module.weight.shape), problem

    return _targets(candidates(), scheme, "model")


EMBEDDING_NAMES = ("embed", "wte", "wpe", "embeddings")


def plan_state_dict(shapes: dict[str, tuple[int, ...]], dtypes: dict[str, str],
                    scheme: QuantScheme) -> dict[str, LayerQuant]:
    """`plan` for a state dict without a model: the 2-D floating `*.weight` tensors of non-skipped, non-embedding
    modules (for Llama/MiniCPM-style models, exactly the linears `prepare` swaps). Keys are tensor names."""
    candidates = (
        (name, name.removesuffix(".weight"), shape, None) for name, shape in shapes.items()
        if name.endswith(".weight") and len(shape) == 2 and dtypes[name].startswith(("float", "bfloat"))
        and not any(e in name.removesuffix(".weight").rsplit(".", 1)[-1] for e in EMBEDDING_NAMES)
    )
    return _targets(candidates, scheme, "checkpoint")


def prepare(model: nn.Module, scheme: QuantScheme) -> nn.Module:
    """Make every targeted linear a QATLinear in place, and record the scheme in `model.config`."""
    targets = plan(model, scheme)
    _watch_optimizer_steps()
    for name, module in model.named_modules():
        if name in targets:
            module.__class__ = QATLinear
            module.quant = targets[name]
            module.quant_name = name
    config = getattr(model, "config", None)
    if config is not None:
        setattr(config, CONFIG_KEY, scheme.to_dict())
    return model


def qat_layers(model: nn.Module) -> dict[str, QATLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QATLinear)}


@torch.no_grad()
def fuse(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Turn every QATLinear back into an nn.Linear holding its fused weight; drop the scheme from the config."""
    for module in qat_layers(model).values():
        fused = fake_quantize(module.weight, module.quant, dtype=dtype, name=module.quant_name)
        module.weight = nn.Parameter(fused, requires_grad=module.weight.requires_grad)
        module.__class__ = nn.Linear
        for attribute in ("quant", "quant_name", "_fused", "_fused_key", "cache_fused"):
            module.__dict__.pop(attribute, None)
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, CONFIG_KEY):
        delattr(config, CONFIG_KEY)
    return model
