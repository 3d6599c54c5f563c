"""What every inference engine shares: the `Engine` / `Session` interface, the prompt type, the sampling checks, the
context fit, the top-k logprobs entry with the greedy-tie rule, and the results document's `runtime` entry.
"""

from __future__ import annotations

import importlib.util
import json
import math
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from bitcpm_cli.core.errors import InputError, did_you_mean
from bitcpm_cli.core.runtime.device import cann_version, package_version


@dataclass
class ModelCard:
    """What a model is, read without its weights: enough to refuse it before anything heavy is loaded."""

    path: str
    tokens: list[str | None]  # token string of every id the model has logits for (None: no token there)
    max_context: int | None
    encode: Callable[[str], list[int]]  # the model's own tokenizer: text -> ids, without BOS/EOS
    bos: int | None
    eos: int | None
    add_bos: bool  # the model's tokenizer puts BOS before a plain text (transformers: its post-processor; GGUF:
    # tokenizer.ggml.add_bos_token, llama_vocab_get_add_bos); `eval` scores as it does


class Session:
    """An opened model. `info` is the results document's `model` entry."""

    info: dict[str, Any]
    notes: list[str]

    def generate(self, prompts: list, **settings: Any) -> dict[str, Any]:
        raise NotImplementedError

    def score(self, ids: Sequence[int]):
        """float32 logits (len(ids), vocab) as a torch tensor: row i predicts token i + 1."""
        raise NotImplementedError

    def close(self) -> None:
        pass


class Engine:
    name: str
    extra: str | None = None  # the pyproject extra that installs it
    module: str | None = None  # the package it needs
    # True where the engine quantizes activations its own way (llama.cpp: by tensor type): `infer` refuses an
    # --activations override for it, `eval` runs it as it decides and reports that.
    decides_activations: bool = False

    def accepts(self, path: Path) -> bool:
        raise NotImplementedError

    def require(self) -> None:
        if self.module and importlib.util.find_spec(self.module) is None:
            raise InputError(f"the {self.name} engine needs {self.module}",
                             hint=f"pip install -e '.[{self.extra}]'")

    def card(self, path: Path, trust_remote_code: bool = False) -> ModelCard:
        raise NotImplementedError

    def check_chat_template(self, path: Path, trust_remote_code: bool = False) -> str:
        """Compile the chat template `--chat` will render for this model, without loading its weights (a broken
        one is an InputError naming where it came from); returns that source."""
        raise NotImplementedError

    def check_activations(self, path: Path, activations: str | None) -> None:
        """Refuse, before any weight is read, a model whose activation scheme (its own, or the `activations`
        override) this engine cannot run. By default an engine runs a model as it is, and takes no override."""
        check_activations_option(activations)
        if activations is not None:
            raise InputError(f"--activations {activations}: the {self.name} engine cannot change a model's "
                             "activation scheme", hint="drop --activations, or run a model folder with --engine hf")

    def open(self, path: Path, *, device: str = "auto", dtype: str = "bfloat16", trust_remote_code: bool = False,
             qat_forward: bool = False, context: int | None = None, activations: str | None = None) -> Session:
        """The model, loaded to run; `activations` overrides its activation scheme (None: the model's own). The
        session's `info["activations"]` says which scheme it runs."""
        raise NotImplementedError


def check_activations_option(activations: str | None) -> None:
    """An `--activations` override names a scheme (None: the model's own)."""
    from bitcpm_cli.core.quant.scheme import ACTIVATION_SCHEMES

    if activations is not None and activations not in ACTIVATION_SCHEMES:
        raise InputError(f"--activations {activations!r} is not one of {', '.join(ACTIVATION_SCHEMES)}"
                         f"{did_you_mean(str(activations), ACTIVATION_SCHEMES)}",
                         hint="leave --activations out to run each model's recorded activation scheme")


TextCallback = Callable[[int, str], None]  # (prompt id, newly generated text)


@dataclass
class Prompt:
    id: int
    text: str | None = None
    messages: list[dict[str, str]] | None = None

    @property
    def label(self) -> str:
        return self.text if self.text is not None else json.dumps(self.messages, ensure_ascii=False)


def check_sampling(max_new_tokens: int, temperature: float, top_p: float, logprobs: int, batch_size: int = 1,
                   seed: int = 0, vocab_size: int | None = None) -> None:
    """Every sampling setting finite and in range, all problems reported at once: before any model is loaded, and
    again by the engine once it knows the model's vocabulary (`vocab_size`: the logits of a step), before generating:
    --logprobs K is at most the vocabulary in every engine (never clamped)."""
    problems = []
    if max_new_tokens < 1:
        problems.append(f"--max-new-tokens {max_new_tokens}: must be at least 1")
    if batch_size < 1:
        problems.append(f"--batch-size {batch_size}: must be at least 1")
    if logprobs < 0:
        problems.append(f"--logprobs {logprobs}: must be at least 0")
    elif vocab_size is not None and logprobs > vocab_size:
        problems.append(f"--logprobs {logprobs}: more than the model's vocabulary of {vocab_size} tokens")
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


def top_logprobs(ranked: list[tuple[int, float]], k: int, chosen: int, chosen_logp: float,
                 greedy: bool = True) -> list[list[float]]:
    """One step's `top_logprobs` entry, the same in every engine: the k most likely `[token id, logprob]` (rounded to
    6 places), best first, as the engine ranked them (`ranked`: unrounded). Under greedy decoding an exact tie for
    first place (common in bf16) lists the token that greedy decoding picked first."""
    top = [[int(index), round(float(value), 6)] for index, value in ranked[:k]]
    if greedy and top[0][0] != chosen and chosen_logp == ranked[0][1]:
        top = [[chosen, top[0][1]]] + [t for t in top if t[0] != chosen][:k - 1]
    return top


def describe_runtime(engine: str, device: str, device_name: str, *, torch: str | None = None,
                     transformers: str | None = None, npu: bool = False, **versions: str | None) -> dict[str, Any]:
    """The results document's `runtime` entry, the same keys for every engine: the engine, its device, the torch and
    transformers versions (an engine that runs them passes the running modules' `__version__`; else the installed
    packages' are read), the engine's own packages (`versions`), torch_npu and CANN (when the engine runs through
    torch_npu and it is installed) and the host."""
    torch_npu = package_version("torch_npu") if npu else None
    return {"engine": engine, "device": device, "device_name": device_name,
            "torch": torch or package_version("torch"), "transformers": transformers or package_version("transformers"),
            **versions, "torch_npu": torch_npu, "cann": cann_version() if torch_npu else None, "host": platform.node()}
