"""The llama.cpp engine (llama-cpp-python, the `gguf` extra): greedy generation from a GGUF file into the same
results JSON as the transformers engine, so `bitcpm compare` can set one against the other."""

from __future__ import annotations

import platform
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from bitcpm_cli.core.engines.base import (
    Engine,
    ModelCard,
    Prompt,
    Session,
    TextCallback,
    check_activations_option,
    check_sampling,
    describe_runtime,
    fit_context,
    top_logprobs,
)
from bitcpm_cli.core.errors import InputError
from bitcpm_cli.core.formats.results import results_document
from bitcpm_cli.core.model.chat import END_OF_TURN_TOKENS


def _load(path: Path, seed: int):
    LlamaCppEngine().require()
    import llama_cpp

    return llama_cpp, _open(path, "--engine llama.cpp takes a .gguf file", n_ctx=0, seed=seed)


def gguf_template_source(path: Path) -> str:
    """Where a GGUF file's chat template lives, for error messages."""
    return f"{path}'s tokenizer.chat_template"


def _render_chat(path: Path, template: str | None, messages: list[dict[str, str]], special: dict[str, str]) -> str:
    """The GGUF's chat template (bitcpm's default ChatML without one), rendered by transformers' own renderer (its
    sandbox, `raise_exception`, `strftime_now`, loop controls), as `apply_chat_template` renders it for the
    transformers engine; a template that fails is an InputError naming the GGUF's tokenizer.chat_template."""
    from bitcpm_cli.core.model.chat import render_template

    return render_template(template, messages, source=gguf_template_source(path), add_generation_prompt=True,
                           **special)


def _top(logits: np.ndarray, k: int, chosen: int) -> list[list[float]]:
    logp = logits.astype(np.float64) - logits.max()
    logp -= np.log(np.exp(logp).sum())
    order = np.argsort(-logp, kind="stable")[:k]
    return top_logprobs([(int(i), float(logp[i])) for i in order], k, chosen, float(logp[chosen]))


def run_llamacpp(model: str | Path, prompts: list[Prompt], *, max_new_tokens: int = 128, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int = 42, chat: bool = False, logprobs: int = 0,
                 on_text: TextCallback | None = None, truncate_prompt: bool = False) -> dict[str, Any]:
    path = Path(model)
    check_sampling(max_new_tokens, temperature, top_p, logprobs, seed=seed)
    if temperature != 0 or top_p != 1:
        raise InputError("the llama.cpp engine decodes greedily only", hint="use --temperature 0 --top-p 1")
    llama_cpp, llm = _load(path, seed)
    try:
        metadata = llm.metadata
        check_sampling(max_new_tokens, temperature, top_p, logprobs, seed=seed, vocab_size=llm.n_vocab())
        eos_ids = {llm.token_eos()}
        if chat:
            for token in END_OF_TURN_TOKENS:
                ids = llm.tokenize(token.encode(), add_bos=False, special=True)
                if len(ids) == 1:
                    eos_ids.add(ids[0])
        special = {"bos_token": llm.detokenize([llm.token_bos()], special=True).decode(errors="replace"),
                   "eos_token": llm.detokenize([llm.token_eos()], special=True).decode(errors="replace")}
        n_vocab = llm.n_vocab()
        results, total_time, notes = [], 0.0, []
        for prompt in prompts:
            if chat:
                text = _render_chat(path, metadata.get("tokenizer.chat_template"),
                                    prompt.messages or [{"role": "user", "content": prompt.text}], special)
                ids = llm.tokenize(text.encode(), add_bos=False, special=True)
            elif prompt.text is None:
                raise InputError(f"prompt {prompt.id} has messages but --chat was not given", hint="pass --chat")
            else:
                ids = llm.tokenize(prompt.text.encode(), add_bos=True, special=False)
            ids = fit_context(ids, max_new_tokens, llm.n_ctx(), truncate_prompt, prompt.id, notes)
            began = time.perf_counter()
            llm.reset()
            llm.eval(ids)
            new, steps, shown = [], [], ""
            for _ in range(max_new_tokens):
                logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,)).copy()
                token = int(np.argmax(logits))
                new.append(token)
                if logprobs:
                    steps.append(_top(logits, logprobs, token))
                if on_text is not None:
                    decoded = _decode(llm, new)
                    if len(decoded) > len(shown) and not decoded.endswith("\ufffd"):
                        on_text(prompt.id, decoded[len(shown):])
                        shown = decoded
                if token in eos_ids:
                    break
                llm.eval([token])
            elapsed = time.perf_counter() - began
            total_time += elapsed
            entry = {"id": prompt.id, "prompt": prompt.label, "prompt_token_ids": ids, "token_ids": new,
                     "text": _decode(llm, new), "num_tokens": len(new), "latency_s": round(elapsed, 6),
                     "tokens_per_s": round(len(new) / elapsed, 3) if elapsed else None}
            if logprobs:
                entry["top_logprobs"] = steps
            results.append(entry)
        sampling = {"temperature": 0.0, "top_p": 1.0, "seed": seed, "max_new_tokens": max_new_tokens,
                    "chat_template": chat, "batch_size": 1, "logprobs": logprobs}
        runtime = describe_runtime("llama.cpp", "cpu", platform.processor() or platform.machine(),
                                   llama_cpp=llama_cpp.__version__)
        return results_document(model_info(path, llm), runtime, sampling, results, total_time, notes)
    finally:
        llm.close()  # the model's memory goes now, not whenever the collector runs


def model_info(path: Path, llm: Any) -> dict[str, Any]:
    """The results document's `model` entry for a GGUF file."""
    from bitcpm_cli.core.formats.fingerprint import sha256_file
    from bitcpm_cli.core.formats.gguf_blocks import FILE_TYPE_NAMES

    file_type = llm.metadata.get("general.file_type")
    return {"path": str(path), "fingerprint": sha256_file(path),
            "dtype": FILE_TYPE_NAMES.get(int(file_type or -1), f"gguf file type {file_type}"),
            "format": "gguf", "activations": gguf_activations(path)}


def gguf_activations(path: Path) -> str:
    """How llama.cpp quantizes the activations of a GGUF file's matrix multiplications, from its tensor types:
    'llama.cpp: q8_k (TQ2_0), f16 (F16)' (most tensors first). The token embedding is a lookup, not a product
    (unless it is also the output head)."""
    from gguf import GGUFReader

    from bitcpm_cli.core.formats.gguf_blocks import GGUF_ACTIVATIONS

    reader = GGUFReader(path)
    try:
        names = {tensor.name for tensor in reader.tensors}
        counts: dict[str, int] = {}
        for tensor in reader.tensors:
            lookup = tensor.name == "token_embd.weight" and "output.weight" in names
            if len(tensor.shape) >= 2 and not lookup:
                counts[tensor.tensor_type.name] = counts.get(tensor.tensor_type.name, 0) + 1
    finally:
        del reader  # its memory map
    ordered = sorted(counts, key=lambda name: (-counts[name], name))
    return "llama.cpp: " + ", ".join(f"{GGUF_ACTIVATIONS.get(name, 'as llama.cpp decides')} ({name})"
                                     for name in ordered)


def _open(path: Path, refusal: str = "not a .gguf file", **options: Any):
    """A llama.cpp model on the CPU; a path that is not a .gguf file is refused with `refusal`, a file llama.cpp
    cannot load named."""
    import llama_cpp

    if not path.is_file() or path.suffix != ".gguf":
        raise InputError(f"{refusal} ({path})", hint="make one with `bitcpm convert --format gguf`")
    try:
        return llama_cpp.Llama(model_path=str(path), n_gpu_layers=0, verbose=False, **options)
    except (ValueError, RuntimeError) as exc:
        raise InputError(f"llama.cpp cannot load {path} ({exc})",
                         hint="re-create it with `bitcpm convert --format gguf`") from None


# ---- scoring (bitcpm eval) ------------------------------------------------------------------------------
def read_vocabulary(path: Path) -> tuple[list[str | None], int | None, Any]:
    """(token string of every id, training context length, a vocabulary-only Llama that tokenizes) of a GGUF file,
    without loading its weights."""
    from llama_cpp._utils import suppress_stdout_stderr

    with suppress_stdout_stderr(disable=False):  # llama.cpp warns that a vocabulary has no training context
        llm = _open(path, vocab_only=True, n_ctx=8, n_batch=8)
    tokens = [llm._model.token_get_text(i) for i in range(llm.n_vocab())]
    architecture = llm.metadata.get("general.architecture")
    context = llm.metadata.get(f"{architecture}.context_length")
    return tokens, int(context) if context is not None else None, llm


def open_for_scoring(path: Path, context: int):
    """A llama.cpp context that keeps the logits of every position of a window of `context` tokens."""
    return _open(path, n_ctx=context, n_batch=context, n_ubatch=context, logits_all=True)


def score_tokens(llm: Any, ids) -> Any:
    """float32 logits (len(ids), vocab) for token ids fed as they are (no BOS added, no text round trip)."""
    import torch

    llm.reset()
    llm.eval(list(ids))
    return torch.from_numpy(np.array(llm.scores[:len(ids)], dtype=np.float32))


def _decode(llm: Any, tokens: list[int]) -> str:
    """Text of generated tokens without special tokens, as transformers' decode(skip_special_tokens=True) gives it."""
    return llm.detokenize(tokens).decode("utf-8", errors="replace").removeprefix(" ")


# ---- the engine ---------------------------------------------------------------------------------------
class _LlamaCppSession(Session):
    def __init__(self, path: Path, context: int | None):
        self.path, self.notes = path, []
        self.llm = None  # generation opens the file itself (run_llamacpp); scoring needs logits of every position
        if context:
            self.llm = open_for_scoring(path, context)
            self.info = model_info(path, self.llm)

    def generate(self, prompts: list, **settings: Any) -> dict[str, Any]:
        settings.pop("batch_size", None)
        return run_llamacpp(self.path, prompts, **settings)

    def score(self, ids: Sequence[int]):
        return score_tokens(self.llm, ids)

    def close(self) -> None:
        if self.llm is not None:
            self.llm.close()
            self.llm = None


class LlamaCppEngine(Engine):
    name, extra, module = "llama.cpp", "gguf", "llama_cpp"
    decides_activations = True

    def accepts(self, path: Path) -> bool:
        return path.suffix == ".gguf"

    def card(self, path: Path, trust_remote_code: bool = False) -> ModelCard:
        self.require()
        tokens, max_context, vocab = read_vocabulary(path)
        probe = vocab.tokenize(b"hello", add_bos=True, special=False)  # BOS only where the GGUF says add_bos
        return ModelCard(str(path), tokens, max_context,
                         lambda text: vocab.tokenize(text.encode(), add_bos=False, special=False),
                         vocab.token_bos(), vocab.token_eos(), bool(probe) and probe[0] == vocab.token_bos())

    def check_chat_template(self, path: Path, trust_remote_code: bool = False) -> str:
        from bitcpm_cli.core.model.chat import DEFAULT_TEMPLATE_SOURCE, compile_template

        self.require()
        vocab = read_vocabulary(path)[2]
        try:
            template = vocab.metadata.get("tokenizer.chat_template")
        finally:
            vocab.close()
        if template is None:
            return DEFAULT_TEMPLATE_SOURCE
        compile_template(template, gguf_template_source(path))
        return gguf_template_source(path)

    def check_activations(self, path: Path, activations: str | None) -> None:
        """llama.cpp quantizes activations by the weights' tensor type: an override cannot be honoured."""
        check_activations_option(activations)
        if activations is None:
            return
        raise InputError(f"--activations {activations}: the llama.cpp engine cannot change the activation scheme of "
                         f"{path}; llama.cpp quantizes activations by the weights' tensor type",
                         hint="drop --activations (TQ1_0 / TQ2_0 weights run q8_k activations, Q4_0 / Q8_0 q8_0; "
                              "the results' model.activations says which), or run the model folder with --engine hf")

    def open(self, path: Path, *, device: str = "auto", dtype: str = "bfloat16", trust_remote_code: bool = False,
             qat_forward: bool = False, context: int | None = None, activations: str | None = None) -> Session:
        self.check_activations(path, activations)
        if device not in ("auto", "cpu"):
            raise InputError(f"the llama.cpp engine runs on the CPU, not {device}", hint="use --device cpu (or auto)")
        return _LlamaCppSession(path, context)
