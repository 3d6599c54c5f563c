"""The transformers engine: a fused, QAT, packed or float model folder loaded on NPU / GPU / CPU, deterministic
generation into a results document (bitcpm.results/1), and the logits of a token sequence for `eval`."""

from __future__ import annotations

import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from bitcpm_cli.core.engines.activations import ActivationPlan, apply_activations, plan_activations
from bitcpm_cli.core.engines.base import (
    Engine,
    ModelCard,
    Prompt,
    Session,
    TextCallback,
    check_sampling,
    describe_runtime,
    fit_context,
    top_logprobs,
)
from bitcpm_cli.core.engines.prompts import encode_prompt
from bitcpm_cli.core.errors import InputError
from bitcpm_cli.core.formats.results import results_document
from bitcpm_cli.core.model.checkpoint import read_config, read_tensor_specs
from bitcpm_cli.core.model.config_check import require_consistent_config, require_valid_scales
from bitcpm_cli.core.model.hf import DTYPES, dtype_kwarg, hf_loading, load_tokenizer
from bitcpm_cli.core.model.learned_scales import load_learned_scales, quiet_scale_report, require_scales_fit
from bitcpm_cli.core.model.tokenizer_bos import adds_bos
from bitcpm_cli.core.runtime.device import resolve_device


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    device: Any
    info: dict[str, Any]
    notes: list[str] = field(default_factory=list)


# ---- model loading ---------------------------------------------------------------------------------
def require_model_folder(path: Path) -> None:
    """The transformers engine reads a model folder: a missing path, or a file (a .gguf one named as such), is an
    InputError saying what to pass."""
    if path.is_dir():
        return
    if path.is_file() and path.suffix == ".gguf":
        raise InputError(f"{path} is a GGUF file: the hf engine (transformers) reads a model folder",
                         hint="run a .gguf file with --engine llama.cpp (or --engine auto)")
    if path.exists():
        raise InputError(f"{path} is not a model folder", hint="pass a Hugging Face model folder or a .gguf file")
    raise InputError(f"model folder not found ({path})", hint="pass a Hugging Face model folder (bitcpm convert "
                                                              "writes one) or a .gguf file")


def load_for_inference(path: str | Path, device: str = "auto", dtype: str = "bfloat16",
                       trust_remote_code: bool = False, fuse_qat: bool = True,
                       activations: str | None = None) -> LoadedModel:
    """Load a fused, float, QAT or packed model for generation; QAT checkpoints are fused on load, exactly as
    `convert` would, so a QAT checkpoint and its fused conversion generate identical tokens. With fuse_qat=False a
    QAT checkpoint keeps its fake-quantized linears (the forward training optimizes). The model runs its recorded
    activation scheme (engines/activations.py), or `activations` on every quantized linear; `info["activations"]`
    says which."""
    import torch

    from bitcpm_cli.core.formats.fingerprint import fingerprint

    path = Path(path)
    require_model_folder(path)
    if dtype not in DTYPES:
        raise InputError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}", hint="bfloat16 is what the NPU uses")
    config, files, specs, packed_shapes = read_model_headers(path)
    plan = plan_activations(path, config, specs, packed_shapes, activations)  # before any weight is read
    target = resolve_device(device)  # a missing device fails here, before anything heavy is loaded
    torch_dtype = getattr(torch, dtype)
    from bitcpm_cli.core.model.hf import quiet_transformers

    with quiet_transformers():  # the CLI draws its own output; keep stderr for errors and notes
        tokenizer = load_tokenizer(path, trust_remote_code, padding_side="left")
        with hf_loading(path):
            model, kind, notes = _load_model(path, files, specs, packed_shapes is not None, torch_dtype,
                                             trust_remote_code, fuse_qat, plan)
    model.to(device=target, dtype=torch_dtype).eval()
    info = {"path": str(path), "fingerprint": fingerprint(files), "dtype": dtype, "format": kind}
    info["activations"], activation_notes = apply_activations(model, plan, kind)
    return LoadedModel(model, tokenizer, target, info, notes + activation_notes)


def read_model_headers(path: Path) -> tuple[dict[str, Any], Any, dict[str, Any], dict[str, list[int]] | None]:
    """(config.json, weight files, tensor specs, {packed linear: [out, in]} or None), checked, from headers only."""
    from bitcpm_cli.core.formats.packed import PACKED_SUFFIX, read_packed_shapes

    config = read_config(path)
    files, specs = read_tensor_specs(path)
    if not any(name.endswith(PACKED_SUFFIX) for name in specs):
        require_consistent_config(path)
        return config, files, specs, None
    # packed shapes are not the config's, but its MiniCPM scales must still be numbers the model can use
    require_valid_scales(config, path / "config.json")
    return config, files, specs, read_packed_shapes(files, specs)


def _load_model(path: Path, files, specs, packed: bool, torch_dtype,
                trust_remote_code: bool, fuse_qat: bool, plan: ActivationPlan) -> tuple[Any, str, list[str]]:
    from transformers import AutoModelForCausalLM

    from bitcpm_cli.core.quant import fuse, prepare

    if packed:
        return _load_packed(path, files, specs, torch_dtype, trust_remote_code), "packed", []
    notes: list[str] = []
    scheme = plan.scheme  # a QAT checkpoint's scheme, with the --activations override applied
    if scheme is None or not scheme.learned_scales:  # quant_alpha tensors no scheme uses: refused before loading
        require_scales_fit(specs, {}, path)
    load_dtype = "auto" if scheme else torch_dtype
    with quiet_scale_report():  # the learned scales it calls unexpected are loaded below
        model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=trust_remote_code,
                                                     **{dtype_kwarg(): load_dtype})
    if scheme is None:
        kind = _fused_or_float(model)
        if kind == "float":
            notes.append("the linears are neither fused nor QAT (no bitcpm_quant): running the float model")
        return model, kind, notes
    prepare(model, scheme)
    loaded = load_learned_scales(model, path)  # transformers dropped them as unexpected keys
    if loaded:
        notes.append(f"learned scales: {loaded} linears quantized with their trained scales (quant_alpha)")
    if fuse_qat:
        fuse(model, dtype=torch_dtype)  # keeps each layer's activation quantization as a pre-hook
        notes.append(f"QAT checkpoint: fake quantizer fused on load ({scheme.quant_type}, group_size "
                     f"{scheme.group_size}), as `bitcpm convert` does")
    else:
        notes.append(f"QAT checkpoint: run through the fake quantizer's forward ({scheme.quant_type}, "
                     f"group_size {scheme.group_size})")
    return model, "qat", notes


def _load_packed(path: Path, files, specs, torch_dtype, trust_remote_code: bool) -> Any:
    from transformers import AutoConfig, AutoModelForCausalLM

    from bitcpm_cli.core.formats.packed import unpacked_state_dict

    hf_config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    if hasattr(hf_config, "bitcpm_quant"):
        delattr(hf_config, "bitcpm_quant")
    model = AutoModelForCausalLM.from_config(hf_config, trust_remote_code=trust_remote_code,
                                             **{dtype_kwarg(): torch_dtype})
    missing, unexpected = model.load_state_dict(unpacked_state_dict(files, specs, torch_dtype), strict=False)
    tied = {"lm_head.weight"} if getattr(hf_config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise InputError(f"the packed weights do not fit the config ({path}): missing "
                         f"{sorted(set(missing) - tied)[:3]}, unexpected {sorted(unexpected)[:3]}",
                         hint="re-create the packed model with `bitcpm convert --format packed`")
    model.tie_weights()
    return model


def _fused_or_float(model: Any) -> str:
    """'fused' when the first linear (lm_head aside) holds a fused weight, else 'float'."""
    import torch

    from bitcpm_cli.core.quant import FUSED_GROUP_CANDIDATES, fused_scales

    linear = next((m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n), None)
    is_fused = linear is not None and any(fused_scales(linear.weight.detach(), g) is not None
                                          for g in FUSED_GROUP_CANDIDATES)
    return "fused" if is_fused else "float"


# ---- generation --------------------------------------------------------------------------------------
def _device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "npu":
        return torch.npu.get_device_name(device.index or 0)
    if device.type == "mps":
        return "Apple MPS"
    return platform.processor() or platform.machine()


class _CallbackStreamer:
    """A transformers streamer that hands newly decoded text of one prompt to a callback."""

    def __init__(self, tokenizer, prompt_id: int, callback: TextCallback):
        self.tokenizer, self.prompt_id, self.callback = tokenizer, prompt_id, callback
        self.tokens: list[int] = []
        self.shown = 0
        self._prompt_seen = False

    def put(self, value) -> None:
        if not self._prompt_seen:  # generate() first passes the prompt
            self._prompt_seen = True
            return
        self.tokens += value.reshape(-1).tolist()
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if len(text) > self.shown and not text.endswith("\ufffd"):  # wait for whole UTF-8 characters
            self.callback(self.prompt_id, text[self.shown:])
            self.shown = len(text)

    def end(self) -> None:
        pass


def _logits_width(model) -> int:
    """How many logits a generation step has: the output head's rows (config.json's vocab_size without one)."""
    head = model.get_output_embeddings()
    weight = getattr(head, "weight", None)
    return int(weight.shape[0]) if weight is not None else int(model.config.vocab_size)


def run_generation(loaded: LoadedModel, prompts: list[Prompt], *, max_new_tokens: int = 128,
                   temperature: float = 0.0, top_p: float = 1.0, seed: int = 42, chat: bool = False,
                   logprobs: int = 0, batch_size: int = 1, on_text: TextCallback | None = None,
                   truncate_prompt: bool = False) -> dict[str, Any]:
    """Generate for every prompt and return the results document (docs/reference.md, "Results file")."""
    import torch
    import transformers
    from transformers import GenerationConfig, set_seed

    from bitcpm_cli.core.model.chat import check_chat_template, end_of_turn_ids, ensure_chat_template

    tokenizer, model = loaded.tokenizer, loaded.model
    check_sampling(max_new_tokens, temperature, top_p, logprobs, batch_size, seed, vocab_size=_logits_width(model))
    notes = list(loaded.notes)
    if chat and ensure_chat_template(tokenizer):
        notes.append("the tokenizer has no chat template: used bitcpm's default (ChatML)")
    if chat:
        check_chat_template(tokenizer)
    eos = model.generation_config.eos_token_id
    if eos is None:
        eos = tokenizer.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
    if chat:
        eos_ids |= set(end_of_turn_ids(tokenizer))  # a chat reply ends at the template's end-of-turn token
    sampling = temperature > 0
    config = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=sampling, temperature=temperature if sampling else None,
        top_p=top_p if sampling else None, top_k=None, eos_token_id=sorted(eos_ids) or None,
        pad_token_id=tokenizer.pad_token_id, return_dict_in_generate=True, output_logits=logprobs > 0,
    )
    context = getattr(model.config, "max_position_embeddings", None)
    encoded = [fit_context(encode_prompt(tokenizer, p, chat), max_new_tokens, context, truncate_prompt, p.id, notes)
               for p in prompts]
    results = []
    total_time = 0.0
    for start in range(0, len(prompts), batch_size):
        batch = list(range(start, min(start + batch_size, len(prompts))))
        width = max(len(encoded[i]) for i in batch)
        pad = tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (width - len(encoded[i])) + encoded[i] for i in batch], device=loaded.device)
        mask = torch.tensor([[0] * (width - len(encoded[i])) + [1] * len(encoded[i]) for i in batch],
                            device=loaded.device)
        streamer = (_CallbackStreamer(tokenizer, prompts[batch[0]].id, on_text)
                    if on_text is not None and len(batch) == 1 else None)
        set_seed(seed)
        began = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config, streamer=streamer)
        if loaded.device.type != "cpu":
            getattr(torch, loaded.device.type).synchronize()
        elapsed = time.perf_counter() - began
        total_time += elapsed
        for row, index in enumerate(batch):
            new = out.sequences[row, width:].tolist()
            end = next((k + 1 for k, t in enumerate(new) if t in eos_ids), len(new))
            new = new[:end]
            entry = {"id": prompts[index].id, "prompt": prompts[index].label, "prompt_token_ids": encoded[index],
                     "token_ids": new, "text": tokenizer.decode(new, skip_special_tokens=True),
                     "num_tokens": len(new), "latency_s": round(elapsed, 6),
                     "tokens_per_s": round(len(new) / elapsed, 3) if elapsed else None}
            if logprobs:
                steps = []
                for position, step in enumerate(out.logits[:len(new)]):
                    logp = torch.log_softmax(step[row].float(), dim=-1)
                    values, indices = logp.topk(logprobs)
                    chosen = new[position]
                    steps.append(top_logprobs(list(zip(indices.tolist(), values.tolist())), logprobs, chosen,
                                              float(logp[chosen]), greedy=not sampling))
                entry["top_logprobs"] = steps
            if streamer is None and on_text is not None:
                on_text(prompts[index].id, entry["text"])
            results.append(entry)
    sampling_info = {"temperature": temperature, "top_p": top_p, "seed": seed, "max_new_tokens": max_new_tokens,
                     "chat_template": chat, "batch_size": batch_size, "logprobs": logprobs}
    runtime = describe_runtime("hf", str(loaded.device), _device_name(loaded.device), torch=torch.__version__,
                               transformers=transformers.__version__, npu=True)
    return results_document(loaded.info, runtime, sampling_info, results, total_time, notes)


# ---- the engine ---------------------------------------------------------------------------------------
class _HFSession(Session):
    def __init__(self, loaded):
        self.loaded = loaded
        self.info, self.notes = loaded.info, loaded.notes

    def generate(self, prompts: list, **settings: Any) -> dict[str, Any]:
        return run_generation(self.loaded, prompts, **settings)

    def score(self, ids: Sequence[int]):
        import torch

        with torch.inference_mode():
            tensor = torch.tensor([list(ids)], dtype=torch.long, device=self.loaded.device)
            return self.loaded.model(input_ids=tensor).logits[0].float().cpu()

    def close(self) -> None:
        del self.loaded


class HFEngine(Engine):
    name = "hf"

    def accepts(self, path: Path) -> bool:
        return path.is_dir()

    def card(self, path: Path, trust_remote_code: bool = False) -> ModelCard:
        require_model_folder(path)
        config = read_config(path)
        tokenizer = load_tokenizer(path, trust_remote_code)
        width = config.get("vocab_size") or len(tokenizer)
        tokens: list[str | None] = [None] * max(width, len(tokenizer))
        for token, index in tokenizer.get_vocab().items():
            tokens[index] = token
        return ModelCard(str(path), tokens, config.get("max_position_embeddings"),
                         lambda text: tokenizer(text, add_special_tokens=False)["input_ids"],
                         tokenizer.bos_token_id, tokenizer.eos_token_id, adds_bos(tokenizer))

    def check_chat_template(self, path: Path, trust_remote_code: bool = False) -> str:
        from bitcpm_cli.core.model.chat import check_chat_template, ensure_chat_template

        require_model_folder(path)
        tokenizer = load_tokenizer(path, trust_remote_code)
        ensure_chat_template(tokenizer)
        return check_chat_template(tokenizer)

    def check_activations(self, path: Path, activations: str | None) -> None:
        require_model_folder(path)
        config, _, specs, packed_shapes = read_model_headers(path)
        plan_activations(path, config, specs, packed_shapes, activations)

    def open(self, path: Path, *, device: str = "auto", dtype: str = "bfloat16", trust_remote_code: bool = False,
             qat_forward: bool = False, context: int | None = None, activations: str | None = None) -> Session:
        return _HFSession(load_for_inference(path, device=device, dtype=dtype, trust_remote_code=trust_remote_code,
                                             fuse_qat=not qat_forward, activations=activations))
