"""Deterministic generation with transformers on NPU / GPU / CPU, written as a results JSON (bitcpm.results/1)."""

from __future__ import annotations

import json
import math
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from bitcpm_cli.core.checkpoint import (
    dtype_kwarg,
    hf_loading,
    load_tokenizer,
    read_config,
    read_tensor_specs,
)
from bitcpm_cli.core.config_check import require_consistent_config
from bitcpm_cli.core.device import package_version, cann_version, resolve_device
from bitcpm_cli.core.engines import results_document
from bitcpm_cli.core.errors import InputError
from bitcpm_cli.core.outputs import check_output, write_text_output
from bitcpm_cli.core.readers import json_records, read_text_file

DTYPES = ("bfloat16", "float16", "float32")
TextCallback = Callable[[int, str], None]  # (prompt id, newly generated text)


@dataclass
class Prompt:
    id: int
    text: str | None = None
    messages: list[dict[str, str]] | None = None

    @property
    def label(self) -> str:
        return self.text if self.text is not None else json.dumps(self.messages, ensure_ascii=False)


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    device: Any
    info: dict[str, Any]
    notes: list[str] = field(default_factory=list)


# ---- prompts -------------------------------------------------------------------------------------
def _prompt_from_json(obj: Any, index: int, where: str) -> Prompt:
    if not isinstance(obj, dict):
        raise InputError(f"{where}: expected a JSON object with 'prompt' or 'messages'", hint='e.g. {"prompt": "Hi"}')
    pid = obj.get("id", index)
    if isinstance(pid, bool) or not isinstance(pid, (int, str)):
        raise InputError(f"{where}: 'id' must be an integer or a string", hint='e.g. {"id": 3, "prompt": "Hi"}')
    if isinstance(obj.get("prompt"), str):
        return Prompt(pid, text=obj["prompt"])
    messages = obj.get("messages")
    if (isinstance(messages, list) and messages
            and all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                    for m in messages)):
        return Prompt(pid, messages=messages)
    raise InputError(f"{where}: needs a 'prompt' string or a 'messages' list of {{role, content}}",
                     hint='e.g. {"messages": [{"role": "user", "content": "Hi"}]}')


def read_prompts(prompts: list[str] | None, prompts_file: str | Path | None) -> list[Prompt]:
    """Prompts from --prompt (repeatable) or a file: .txt (one a line), .jsonl / .json (`prompt` or `messages`)."""
    if bool(prompts) == (prompts_file is not None):
        raise InputError("give either --prompt (one or more) or --prompts FILE", hint="e.g. --prompt 'Hello'")
    if prompts:
        return [Prompt(i, text=p) for i, p in enumerate(prompts)]
    path = Path(prompts_file)
    if not path.is_file():
        raise InputError(f"prompts file not found ({path})", hint="check the path")
    if path.suffix in (".jsonl", ".json"):
        result = [_prompt_from_json(obj, i, where) for i, (where, obj) in enumerate(json_records(path, "prompts"))]
    else:
        lines = read_text_file(path, "prompts file").splitlines()
        result = [Prompt(i, text=line) for i, line in enumerate(line for line in lines if line.strip())]
    if not result:
        raise InputError(f"the prompts file holds no prompts ({path})", hint="add one prompt a line")
    return result


# ---- model loading ---------------------------------------------------------------------------------
def load_for_inference(path: str | Path, device: str = "auto", dtype: str = "bfloat16",
                       trust_remote_code: bool = False, fuse_qat: bool = True) -> LoadedModel:
    """Load a fused, float, QAT or packed model for generation; QAT checkpoints are fused on load, exactly as
    `convert` would, so a QAT checkpoint and its fused conversion generate identical tokens. With fuse_qat=False a
    QAT checkpoint keeps its fake-quantized linears (the forward training optimizes)."""
    import torch

    from bitcpm_cli.core.formats import PACKED_SUFFIX, fingerprint

    path = Path(path)
    if not path.is_dir():
        raise InputError(f"model folder not found ({path})", hint="pass a Hugging Face model folder (bitcpm convert "
                                                                  "writes one)")
    if dtype not in DTYPES:
        raise InputError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}", hint="bfloat16 is what the NPU uses")
    config = read_config(path)
    files, specs = read_tensor_specs(path)
    packed = any(name.endswith(PACKED_SUFFIX) for name in specs)
    if not packed:
        require_consistent_config(path)
    target = resolve_device(device)  # a missing device fails here, before anything heavy is loaded
    torch_dtype = getattr(torch, dtype)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the CLI draws its own output; keep stderr for errors and notes
    tokenizer = load_tokenizer(path, trust_remote_code, padding_side="left")
    with hf_loading(path):
        model, kind, notes = _load_model(path, config, files, specs, packed, torch_dtype, trust_remote_code,
                                         fuse_qat)
    model.to(device=target, dtype=torch_dtype).eval()
    info = {"path": str(path), "fingerprint": fingerprint(files), "dtype": dtype, "format": kind}
    return LoadedModel(model, tokenizer, target, info, notes)


def _load_model(path: Path, config: dict[str, Any], files, specs, packed: bool, torch_dtype,
                trust_remote_code: bool, fuse_qat: bool) -> tuple[Any, str, list[str]]:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from bitcpm_cli.core.formats import unpacked_state_dict
    from bitcpm_cli.core.quant import FUSED_GROUP_CANDIDATES, QuantScheme, fuse, fused_scales, prepare

    notes: list[str] = []
    scheme = QuantScheme.from_config(config)
    if packed:
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
        kind = "packed"
    else:
        load_dtype = "auto" if scheme else torch_dtype
        model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=trust_remote_code,
                                                     **{dtype_kwarg(): load_dtype})
        if scheme is not None:
            prepare(model, scheme)
            if fuse_qat:
                fuse(model, dtype=torch_dtype)
                notes.append(f"QAT checkpoint: fake quantizer fused on load ({scheme.quant_type}, group_size "
                             f"{scheme.group_size}), as `bitcpm convert` does")
            else:
                notes.append(f"QAT checkpoint: run through the fake quantizer's forward ({scheme.quant_type}, "
                             f"group_size {scheme.group_size})")
            kind = "qat"
        else:
            linear = next((m for n, m in model.named_modules()
                           if isinstance(m, torch.nn.Linear) and "lm_head" not in n), None)
            is_fused = linear is not None and any(fused_scales(linear.weight.detach(), g) is not None
                                                  for g in FUSED_GROUP_CANDIDATES)
            kind = "fused" if is_fused else "float"
            if not is_fused:
                notes.append("the linears are neither fused nor QAT (no bitcpm_quant): running the float model")
    return model, kind, notes


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


def describe_runtime(device) -> dict[str, Any]:
    import torch
    import transformers

    npu = package_version("torch_npu")
    return {"engine": "hf", "device": str(device), "device_name": _device_name(device), "torch": torch.__version__,
            "transformers": transformers.__version__, "torch_npu": npu, "cann": cann_version() if npu else None,
            "host": platform.node()}


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


def _encode(tokenizer, prompt: Prompt, chat: bool) -> list[int]:
    if chat:
        messages = prompt.messages or [{"role": "user", "content": prompt.text}]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    if prompt.text is None:
        raise InputError(f"prompt {prompt.id} has messages but --chat was not given",
                         hint="pass --chat to render messages with the chat template")
    return tokenizer(prompt.text)["input_ids"]


def check_sampling(max_new_tokens: int, temperature: float, top_p: float, logprobs: int, batch_size: int = 1,
                   seed: int = 0) -> None:
    """Every sampling setting finite and in range, all problems reported at once (before any model is loaded)."""
    problems = []
    if max_new_tokens < 1:
        problems.append(f"--max-new-tokens {max_new_tokens}: must be at least 1")
    if batch_size < 1:
        problems.append(f"--batch-size {batch_size}: must be at least 1")
    if logprobs < 0:
        problems.append(f"--logprobs {logprobs}: must be at least 0")
    if not (math.isfinite(temperature) and 0 <= temperature <= 100):
        problems.append(f"--temperature {temperature}: must be a number within [0, 100] (0 = greedy)")
    if not (math.isfinite(top_p) and 0 < top_p <= 1):
        problems.append(f"--top-p {top_p}: must be within (0, 1]")
    if not 0 <= seed < 2**32:
        problems.append(f"--seed {seed}: must be within [0, 2**32)")
    if problems:
        raise InputError(f"invalid sampling settings: {'; '.join(problems)}", hint="fix the flag values named above")


def fit_context(ids: list[int], max_new_tokens: int, context: int | None, truncate: bool, prompt_id: Any,
                notes: list[str]) -> list[int]:
    """A prompt's ids checked against the model's context: refused when too long, or cut to its last tokens
    when `truncate` is asked for (with a note)."""
    if not context or len(ids) + max_new_tokens <= context:
        return ids
    room = context - max_new_tokens
    if not truncate or room < 1:
        raise InputError(f"prompt {prompt_id} has {len(ids)} tokens: with --max-new-tokens {max_new_tokens} it needs "
                         f"{len(ids) + max_new_tokens} positions, the model's context is {context}",
                         hint="shorten the prompt, lower --max-new-tokens, or pass --truncate-prompt to keep its "
                              "last tokens" if room >= 1 else "lower --max-new-tokens below the model's context")
    notes.append(f"prompt {prompt_id}: cut from {len(ids)} to its last {room} tokens (--truncate-prompt)")
    return ids[-room:]


def run_generation(loaded: LoadedModel, prompts: list[Prompt], *, max_new_tokens: int = 128,
                   temperature: float = 0.0, top_p: float = 1.0, seed: int = 42, chat: bool = False,
                   logprobs: int = 0, batch_size: int = 1, on_text: TextCallback | None = None,
                   truncate_prompt: bool = False) -> dict[str, Any]:
    """Generate for every prompt and return the results document (docs/reference.md, "Results file")."""
    import torch
    from transformers import GenerationConfig, set_seed

    from bitcpm_cli.core.chat import end_of_turn_ids, ensure_chat_template

    check_sampling(max_new_tokens, temperature, top_p, logprobs, batch_size, seed)
    tokenizer, model = loaded.tokenizer, loaded.model
    notes = list(loaded.notes)
    if chat and ensure_chat_template(tokenizer):
        notes.append("the tokenizer has no chat template: used bitcpm's default (ChatML)")
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
    encoded = [fit_context(_encode(tokenizer, p, chat), max_new_tokens, context, truncate_prompt, p.id, notes)
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
                    top = [[int(i), round(float(v), 6)] for i, v in zip(indices, values)]
                    chosen = new[position]
                    if not sampling and top[0][0] != chosen and float(logp[chosen]) == float(values[0]):
                        # an exact tie (common in bf16): list the token greedy decoding picked first
                        top = [[chosen, top[0][1]]] + [t for t in top if t[0] != chosen][:logprobs - 1]
                    steps.append(top)
                entry["top_logprobs"] = steps
            if streamer is None and on_text is not None:
                on_text(prompts[index].id, entry["text"])
            results.append(entry)
    sampling_info = {"temperature": temperature, "top_p": top_p, "seed": seed, "max_new_tokens": max_new_tokens,
                     "chat_template": chat, "batch_size": batch_size, "logprobs": logprobs}
    return results_document(loaded.info, describe_runtime(loaded.device), sampling_info, results, total_time, notes)


def check_output_path(output: str | Path, inputs: Iterable[str | Path | None] = (), overwrite: bool = False,
                      what: str = "--output") -> Path:
    """The output guard's checks (core.outputs) for a JSON file, before any work is done."""
    return check_output(output, inputs, overwrite=overwrite, kind="file", what=what)


def write_json(document: dict[str, Any], output: str | Path, inputs: Iterable[str | Path | None] = (),
               overwrite: bool = False, what: str = "--output") -> None:
    """Write a JSON document through the output guard (claimed, staged, renamed into place; strict JSON)."""
    text = json.dumps(document, indent=2, ensure_ascii=False, allow_nan=False) + "\n"
    write_text_output(text, output, inputs, overwrite=overwrite, what=what)
