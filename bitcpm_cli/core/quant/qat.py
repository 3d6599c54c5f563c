"""QAT modules: swap a causal LM's linears for fake-quantized ones, and fuse them back."""

from __future__ import annotations

import math

import torch
from torch import nn

from bitcpm_cli.core.errors import QuantError, collect
from bitcpm_cli.core.quant.activations import (
    FUSED_CONFIG_KEY,
    attach_activations,
    block_problem,
    detach_activations,
    fake_quantize_activations,
    fused_record,
)
from bitcpm_cli.core.quant.functional import SCALE_PARAM, TERNARY_EPS, absmean_scales, check_groupable, fake_quantize
from bitcpm_cli.core.quant.scheme import CONFIG_KEY, LayerQuant, QuantScheme, is_embedding_name

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


Lora = tuple  # (A [r, in], B [out, r], scaling): a low-rank term added to the latent weight inside the quantizer


def _latent(weight: torch.Tensor, lora: Lora | None) -> torch.Tensor:
    """The weight the quantizer sees: the latent weight, plus `scaling * B @ A` in float32 under LoRA."""
    if lora is None:
        return weight.detach()
    a, b, scaling = lora
    return weight.detach().to(torch.float32) + scaling * (b.detach().to(torch.float32) @ a.detach().to(torch.float32))


def _group_length(shape: torch.Size, group_size: int) -> int:
    return shape[0] * shape[1] if group_size == 0 else shape[1] if group_size == -1 else group_size


def lsq_scale_grad(latent: torch.Tensor, alpha: torch.Tensor, grad_fused: torch.Tensor, spec: LayerQuant
                   ) -> torch.Tensor:
    """LSQ's gradient of the fused weight `s * clamp(round(w / s), -1, 1)` with respect to each group's scale `s`
    (Esser et al., 2020): `round(w/s) - w/s` inside the range, the clamp bound (-1 or +1) outside, summed over the
    group and scaled by `1 / sqrt(n * Qp)` (n weights in the group, Qp = 1 for ternary). A scale held at the floor
    (1e-5) gets no gradient, as a clamp would give it."""
    rows, groups = alpha.shape
    w = latent.to(torch.float32).reshape(rows, groups, -1)
    s = alpha.detach().to(torch.float32).clamp_min(TERNARY_EPS).unsqueeze(-1)
    v = w / s
    factor = torch.where(v < -1, -1.0, torch.where(v > 1, 1.0, torch.round(v) - v))
    grad = (grad_fused.to(torch.float32).reshape(rows, groups, -1) * factor).sum(-1)
    grad = grad / math.sqrt(_group_length(latent.shape, spec.group_size) * 1)
    return (grad * (alpha.detach() >= TERNARY_EPS)).to(alpha.dtype)


class _QuantizedWeight(torch.autograd.Function):
    """Forward: a precomputed fused weight. Backward: the gradient goes to the latent weight unchanged (STE), to the
    learned scales by LSQ, and to LoRA factors through the STE (`W + scaling * B @ A` gets the fused gradient)."""

    @staticmethod
    def forward(ctx, weight, fused, alpha, lora_a, lora_b, spec, scaling):  # type: ignore[override]
        ctx.spec, ctx.scaling = spec, scaling
        ctx.save_for_backward(weight, alpha, lora_a, lora_b)
        return fused.view_as(fused)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):  # type: ignore[override]
        weight, alpha, a, b = ctx.saved_tensors
        needs = ctx.needs_input_grad
        lora = None if a is None else (a, b, ctx.scaling)
        grad_weight = grad_output.to(weight.dtype) if needs[0] else None
        grad_alpha = lsq_scale_grad(_latent(weight, lora), alpha, grad_output, ctx.spec) if needs[2] else None
        grad_a = grad_b = None
        if lora is not None:
            g = grad_output.to(torch.float32)
            if needs[3]:
                grad_a = (ctx.scaling * (b.detach().to(torch.float32).t() @ g)).to(a.dtype)
            if needs[4]:
                grad_b = (ctx.scaling * (g @ a.detach().to(torch.float32).t())).to(b.dtype)
        return grad_weight, None, grad_alpha, grad_a, grad_b, None, None


def _version(tensor: torch.Tensor | None) -> tuple | None:
    return None if tensor is None else (tensor.data_ptr(), tensor._version)


class QATLinear(nn.Linear):
    """nn.Linear whose forward sees the fake-quantized weight (STE backward).

    Parameter names are those of nn.Linear, so state dicts stay loadable by stock transformers; a learned-scales
    layer also holds `quant_alpha` (float32 [rows, groups]). The fused weight is computed once per change of what it
    depends on (an optimizer step, an in-place write, new storage), not once per micro-batch: gradient accumulation
    and activation recomputation reuse it.
    """

    quant: LayerQuant
    quant_name: str
    cache_fused = True  # False under weight sharding (see fused_weight)

    def scales(self) -> torch.Tensor | None:
        """The learned scales of a learned-scales layer, else None (the quantizer computes them)."""
        return self.quant_alpha if self.quant.learned else None

    def latent_weight(self, lora: Lora | None = None) -> torch.Tensor:
        """What the quantizer sees (no grad): the latent weight, or under LoRA `W + scaling * B @ A` in float32 --
        the exact tensor a merged checkpoint stores so that its forward is this layer's."""
        return _latent(self.weight, lora)

    def _compute_fused(self, lora: Lora | None) -> torch.Tensor:
        with torch.no_grad():
            return fake_quantize(self.latent_weight(lora), self.quant, dtype=self.weight.dtype,
                                 name=self.quant_name, scales=self.scales())

    def fused_weight(self, lora: Lora | None = None) -> torch.Tensor:
        """The fused weight, with autograd to the latent weight (STE), the learned scales (LSQ) and LoRA's A and B.

        Sharded weights (ZeRO-3, FSDP) are whole only inside forward (gathered by the wrapper's hooks): they are
        quantized every time and no full-size copy is kept between forwards."""
        weight, alpha = self.weight, self.scales()
        a, b, scaling = lora if lora is not None else (None, None, 0.0)
        if not self.cache_fused:
            fused = self._compute_fused(lora)
        else:
            key = (_version(weight), _optimizer_steps, weight.dtype, weight.device, _version(alpha), _version(a),
                   _version(b), scaling)
            if getattr(self, "_fused_key", None) != key:
                self._fused = self._compute_fused(lora)
                self._fused_key = key
            fused = self._fused
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (weight, alpha, a, b)):
            return _QuantizedWeight.apply(weight, fused, alpha, a, b, self.quant, scaling)
        return fused

    def quantized_input(self, x: torch.Tensor) -> torch.Tensor:
        """The input as this layer's activation scheme quantizes it (straight-through gradient)."""
        return fake_quantize_activations(x, self.quant.activations)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(self.quantized_input(x), self.fused_weight(), self.bias)

    def extra_repr(self) -> str:
        learned = ", learned_scales=True" if self.quant.learned else ""
        activations = f", activations={self.quant.activations}" if self.quant.activations != "none" else ""
        return (f"{super().extra_repr()}, quant_type={self.quant.quant_type}, group_size={self.quant.group_size}"
                f"{learned}{activations}")


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
            problem = block_problem(spec.activations, shape[1], module)
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



def plan_state_dict(shapes: dict[str, tuple[int, ...]], dtypes: dict[str, str],
                    scheme: QuantScheme) -> dict[str, LayerQuant]:
    """`plan` for a state dict without a model: the 2-D floating `*.weight` tensors of non-skipped, non-embedding
    modules (for Llama/MiniCPM-style models, exactly the linears `prepare` swaps). Keys are tensor names."""
    candidates = (
        (name, name.removesuffix(".weight"), shape, None) for name, shape in shapes.items()
        if name.endswith(".weight") and len(shape) == 2 and dtypes[name].startswith(("float", "bfloat"))
        and not is_embedding_name(name.removesuffix(".weight"))
    )
    return _targets(candidates, scheme, "checkpoint")


def prepare(model: nn.Module, scheme: QuantScheme) -> nn.Module:
    """Make every targeted linear a QATLinear in place, and record the scheme in `model.config`."""
    targets = plan(model, scheme)
    _watch_optimizer_steps()
    for name, module in model.named_modules():
        if name in targets:
            detach_activations(module)  # a fused model's input quantization: the QATLinear's scheme replaces it
            module.__class__ = QATLinear
            module.quant = targets[name]
            module.quant_name = name
            _set_learned_scales(module)
    config = getattr(model, "config", None)
    if config is not None:
        setattr(config, CONFIG_KEY, scheme.to_dict())
        if hasattr(config, FUSED_CONFIG_KEY):  # a fused input's record: the scheme now says it
            delattr(config, FUSED_CONFIG_KEY)
    return model


def _set_learned_scales(module: QATLinear) -> None:
    """A learned-scales layer gets its `quant_alpha` parameter, initialised to the absmean scales of its weight (one
    it already holds, of the right shape, is kept); any other layer holds none."""
    if not module.quant.learned:
        module._parameters.pop(SCALE_PARAM, None)
        return
    existing = module._parameters.get(SCALE_PARAM)
    initial = absmean_scales(module.weight.detach(), module.quant, module.quant_name)
    if existing is None or existing.shape != initial.shape:
        module.register_parameter(SCALE_PARAM, nn.Parameter(initial))


def qat_layers(model: nn.Module) -> dict[str, QATLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QATLinear)}


def release_fused(model: nn.Module) -> None:
    """Drop every layer's cached fused weight (as much memory again as the quantized linears): once training has
    ended, before the final save. The next forward computes it again."""
    for module in qat_layers(model).values():
        for attribute in ("_fused", "_fused_key"):
            module.__dict__.pop(attribute, None)


def learned_scale_params(model: nn.Module) -> dict[str, QATLinear]:
    """`<module>.quant_alpha` (the checkpoint tensor name) -> its layer, for every learned-scales layer."""
    return {f"{name}.{SCALE_PARAM}": m for name, m in qat_layers(model).items() if m.quant.learned}


@torch.no_grad()
def fuse(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Turn every QATLinear back into an nn.Linear holding its fused weight; drop the scheme from the config. A layer
    that quantizes its input keeps doing so (a forward pre-hook, `attach_activations`), and the config records it
    under `bitcpm_activations` as `convert` does: the fused model computes, and saves, what the QAT model does."""
    layers = qat_layers(model)
    activations = {name: m.quant.activations for name, m in layers.items()}
    for module in layers.values():
        fused = fake_quantize(module.weight, module.quant, dtype=dtype, name=module.quant_name, scales=module.scales())
        module.weight = nn.Parameter(fused, requires_grad=module.weight.requires_grad)
        module.__class__ = nn.Linear
        module._parameters.pop(SCALE_PARAM, None)
        for attribute in ("quant", "quant_name", "_fused", "_fused_key", "cache_fused"):
            module.__dict__.pop(attribute, None)
    attach_activations(model, activations)  # after the class change: a QATLinear's forward quantizes its own input
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, CONFIG_KEY):
        delattr(config, CONFIG_KEY)
        if (record := fused_record(activations)) is not None:  # what `convert` records: saving it keeps the scheme
            setattr(config, FUSED_CONFIG_KEY, record)
    return model
