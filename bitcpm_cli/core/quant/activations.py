"""Activation quantization: the input of a quantized linear, fake-quantized exactly as the kernel that serves it.

`activations` in `bitcpm_quant` (global, or per layer under `layers`) names one of:

- `none`: full-precision activations (the default).
- `int8-token`: BitNet b1.58's per-token absmax int8. Its reference code (Microsoft, "The Era of 1-bit LLMs: Training
  Tips, Code and FAQ", `activation_quant`): `scale = 127 / max|x|.clamp(min=1e-5)` over the last dimension,
  `x_q = clamp(round(x * scale), -128, 127) / scale`.
- `q8_k`: llama.cpp's `Q8_K`, the activations a `TQ1_0` / `TQ2_0` matrix multiplies (ggml
  `ggml/src/ggml-quants.c`, `quantize_row_q8_K_ref`, which ggml's x86 CPU backend calls for `Q8_K`): blocks of 256
  along the input dimension; `max` is the first value of largest |x| in the block, sign kept; `iscale = -127 / max`;
  `q = min(127, nearest_int(iscale * x))` (round half to even); `d = 1 / iscale` (float32); an all-zero block has
  `d = 0`, `q = 0`. The matmul uses `d * q`.
- `q8_0`: llama.cpp's `Q8_0`, the activations `Q4_0` / `Q8_0` matrices multiply, as ggml's x86 AVX2 kernel computes
  it (`ggml/src/ggml-cpu/arch/x86/quants.c`, `quantize_row_q8_0`): blocks of 32; `amax = max|x|`;
  `id = 127 / amax` (0 for an all-zero block); `q = round_half_even(x * id)`; the scale stored is
  `d = fp16(amax / 127)`, and the matmul uses `fp32(d) * q`. ggml's portable `quantize_row_q8_0_ref` differs
  (`id = 1 / (amax / 127)` and `roundf`, half away from zero); bitcpm matches the AVX2 kernel because that is what
  llama.cpp runs on the x86 CPUs bitcpm's own llama.cpp evaluation uses.

Arithmetic runs in float32 whatever the model's dtype (the reference formulas evaluated on the float32 value of the
input); the result is cast back to the input's dtype. Training sees these values in the forward and passes the
gradient through unchanged (straight-through estimator). NaN and infinity are not checked (that would cost a host
synchronisation per linear): they propagate through a block or token as they would through the float matmul.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from bitcpm_cli.core.errors import ConfigError, collect, did_you_mean

from bitcpm_cli.core.quant.scheme import ACTIVATION_BLOCKS, ACTIVATION_SCHEMES, is_embedding_name

INT8_TOKEN_EPS = 1e-5
# The config.json key a fused model records its activation scheme under (it has no bitcpm_quant):
# {"<scheme>": [module names whose input that scheme quantizes], ...}; stock transformers ignores it.
FUSED_CONFIG_KEY = "bitcpm_activations"


def block_problem(scheme: str, in_features: int, name: str) -> str | None:
    """Why `scheme` cannot quantize the input of a linear with `in_features` inputs, or None."""
    block = ACTIVATION_BLOCKS.get(scheme)
    if block is not None and in_features % block:
        return (f"{name}: activations {scheme} quantize blocks of {block} input values, which do not divide "
                f"in_features {in_features}")
    return None


def activation_codes(x: torch.Tensor, scheme: str) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 codes [..., in] and the float32 multiplier the kernel applies to them, [..., blocks] (one per token for
    int8-token): `codes * multiplier` (per block) is the dequantized activation. For int8-token the multiplier is
    `1 / scale` only notionally: its dequantization divides (`codes / scale`), so this returns `scale` itself."""
    v = x.detach().to(torch.float32)
    if scheme == "int8-token":
        scale = 127.0 / v.abs().amax(dim=-1, keepdim=True).clamp_(min=INT8_TOKEN_EPS)
        return (v * scale).round_().clamp_(-128, 127), scale
    block = ACTIVATION_BLOCKS.get(scheme)
    if block is None:
        raise ValueError(f"activations {scheme!r} do not quantize")
    grouped = v.reshape(*v.shape[:-1], v.shape[-1] // block, block)
    # C's `127.f / m` is one correctly rounded float division: a tensor divisor keeps it one (`127.0 / t` in torch is
    # `t.reciprocal() * 127`, and CUDA turns `t / 127.0` into `t * (1 / 127)`: each is often one bit off).
    if scheme == "q8_k":
        first = grouped.abs().argmax(dim=-1, keepdim=True)  # torch returns the first index of the maximum
        peak = grouped.gather(-1, first)
        iscale = torch.full_like(peak, -127.0).div_(peak)
        # An all-zero block (and one so small that -127/max overflows: nearest_int(+-inf) stores 0) has codes 0.
        codes = (iscale * grouped).round_().clamp_(max=127).masked_fill_(iscale.isinf(), 0.0)
        d = torch.reciprocal(iscale).masked_fill_(peak == 0, 0.0)
        return codes.reshape(v.shape), d.squeeze(-1)
    amax = grouped.abs().amax(dim=-1, keepdim=True)  # q8_0, AVX2
    inverse = torch.where(amax != 0, torch.full_like(amax, 127.0).div_(amax), torch.zeros_like(amax))
    # A block so small that 127/amax overflows: _mm256_cvtps_epi32(+-inf or NaN) packs to -128; its d is fp16 0.
    codes = (grouped * inverse).round_().masked_fill_(inverse.isinf(), -128.0)
    d = amax.div(torch.full_like(amax, 127.0)).to(torch.float16).to(torch.float32)
    return codes.reshape(v.shape), d.squeeze(-1)


def dequantized(x: torch.Tensor, scheme: str) -> torch.Tensor:
    """The activation the kernel multiplies by, in float32 (no autograd)."""
    codes, multiplier = activation_codes(x, scheme)
    if scheme == "int8-token":
        return codes.div_(multiplier)
    block = ACTIVATION_BLOCKS[scheme]
    grouped = codes.reshape(*codes.shape[:-1], codes.shape[-1] // block, block)
    return grouped.mul_(multiplier.unsqueeze(-1)).reshape(codes.shape)


class _FakeQuantizedInput(torch.autograd.Function):
    """Forward: the kernel's dequantized activation, in the input's dtype. Backward: the gradient unchanged (STE)."""

    @staticmethod
    def forward(ctx, x, scheme):  # type: ignore[override]
        return dequantized(x, scheme).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_output):  # type: ignore[override]
        return grad_output, None


def fake_quantize_activations(x: torch.Tensor, scheme: str) -> torch.Tensor:
    """`x` as the named kernel quantizes it (dequantized, same dtype and shape), with a straight-through gradient;
    `none` returns `x` itself."""
    if scheme == "none":
        return x
    return _FakeQuantizedInput.apply(x, scheme)


HOOK_ATTRIBUTE = "bitcpm_activations"  # a hooked linear's scheme
_HANDLE = "_bitcpm_activations_hook"


def _quantize_input_hook(module: torch.nn.Module, args: tuple) -> tuple:
    return (fake_quantize_activations(args[0], getattr(module, HOOK_ATTRIBUTE)), *args[1:])


def attach_activations(model: torch.nn.Module, schemes: Mapping[str, str]) -> int:
    """Quantize the input of each named linear of a loaded (fused, packed or float) model with its scheme, by a
    forward pre-hook: {module name: scheme}. Returns how many linears now quantize their input. A name that is not an
    nn.Linear of the model is a ConfigError; `none` removes a linear's hook."""
    modules = dict(model.named_modules())
    wrong = [name for name in schemes if not isinstance(modules.get(name), torch.nn.Linear)]
    collect([f"{name}: not a linear layer of the model" for name in wrong], ConfigError,
            f"{len(wrong)} names are no linear layers of the model", "name the model's linear layers")
    count = 0
    for name, scheme in schemes.items():
        module = modules[name]
        detach_activations(module)
        if scheme != "none":
            module.__dict__[_HANDLE] = module.register_forward_pre_hook(_quantize_input_hook)
            setattr(module, HOOK_ATTRIBUTE, scheme)
            count += 1
    return count


def detach_activations(module: torch.nn.Module) -> None:
    """Remove the input quantization `attach_activations` gave `module` (if any)."""
    handle = module.__dict__.pop(_HANDLE, None)
    if handle is not None:
        handle.remove()
    module.__dict__.pop(HOOK_ATTRIBUTE, None)


def recorded_activations(model: torch.nn.Module) -> dict[str, str]:
    """{module name: scheme} of every linear of `model` whose input is quantized (a QATLinear's own scheme, or a
    hooked linear's): what a fused model records under `bitcpm_activations`, grouped by scheme by `fused_record`."""
    found = {}
    for name, module in model.named_modules():
        quant = getattr(module, "quant", None)
        scheme = quant.activations if quant is not None else getattr(module, HOOK_ATTRIBUTE, None)
        if scheme not in (None, "none"):
            found[name] = scheme
    return found


def fused_record(schemes: Mapping[str, str]) -> dict[str, list[str]] | None:
    """The `bitcpm_activations` block of a fused config.json from {module name: scheme}: {scheme: [names]}, None when
    every input is full precision."""
    record: dict[str, list[str]] = {}
    for name, scheme in schemes.items():
        if scheme != "none":
            record.setdefault(scheme, []).append(name)
    return {scheme: sorted(names) for scheme, names in sorted(record.items())} or None


def read_fused_record(record: Any, shapes: Mapping[str, tuple[int, ...]], where: str) -> dict[str, str]:
    """{module name: scheme} from a fused config's `bitcpm_activations` block, checked against the tensor shapes
    ({tensor name: shape}) before any weight is read: every problem (an unknown scheme, a name that is no linear
    weight of the checkpoint, a block that does not divide a layer's inputs, a layer named twice) in one error."""
    if not isinstance(record, Mapping):
        raise ConfigError(f"{where}: {FUSED_CONFIG_KEY} must map an activation scheme to module names, not "
                          f"{type(record).__name__}", hint='e.g. {"q8_k": ["model.layers.0.mlp.down_proj"]}')
    problems: list[str] = []
    schemes: dict[str, str] = {}
    quantizing = [s for s in ACTIVATION_SCHEMES if s != "none"]
    for scheme, names in record.items():
        if scheme not in quantizing:
            problems.append(f"activation scheme {scheme!r} is not one of {', '.join(quantizing)}"
                            f"{did_you_mean(str(scheme), quantizing)}")
            continue
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            problems.append(f"{scheme}: must be a list of module names")
            continue
        for name in names:
            shape = shapes.get(f"{name}.weight")
            if shape is None or len(shape) != 2 or is_embedding_name(name):
                problems.append(f"{scheme}: {name!r} is not a linear layer of this checkpoint (no 2-D {name}.weight)")
            elif name in schemes:
                problems.append(f"{name}: named under both {schemes[name]} and {scheme}")
            elif (problem := block_problem(scheme, shape[1], name)) is not None:
                problems.append(problem)
            else:
                schemes[name] = scheme
    problems = [f"{where}: {FUSED_CONFIG_KEY}: {problem}" for problem in problems]  # one problem alone names the file
    collect(problems, ConfigError, f"{where}: invalid {FUSED_CONFIG_KEY}",
            f"{FUSED_CONFIG_KEY} is written by `bitcpm convert`; convert the QAT checkpoint again")
    return schemes
