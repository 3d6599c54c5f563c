"""Inference engines behind one interface, registered by name.

An engine opens a model file or folder and gives a `Session` that generates for prompts (the results document,
bitcpm.results/1, built by `results_document` below for every engine) and scores a token sequence (the logits of
every position). `infer`, `eval` and `quickstart` ask `engine_for(path)`; adding an engine (vLLM, say) is one module
with an `Engine` subclass and one line in `ENGINES`.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from bitcpm_cli.core.errors import InputError
from bitcpm_cli.core.readers import RESULTS_SCHEMA


def results_document(model: dict[str, Any], runtime: dict[str, Any], sampling: dict[str, Any],
                     results: list[dict[str, Any]], total_time: float, notes: list[str]) -> dict[str, Any]:
    """The results JSON (bitcpm.results/1) of any engine: model, runtime, sampling, per-prompt results, summary."""
    total_tokens = sum(r["num_tokens"] for r in results)
    return {
        "schema": RESULTS_SCHEMA, "model": model, "runtime": runtime, "sampling": sampling, "results": results,
        "summary": {"prompts": len(results), "total_tokens": total_tokens, "total_time_s": round(total_time, 6),
                    "tokens_per_s": round(total_tokens / total_time, 3) if total_time else None,
                    "ms_per_token": round(1000 * total_time / total_tokens, 3) if total_tokens else None},
        "notes": notes,
    }


@dataclass
class ModelCard:
    """What a model is, read without its weights: enough to refuse it before anything heavy is loaded."""

    path: str
    tokens: list[str | None]  # token string of every id the model has logits for (None: no token there)
    max_context: int | None
    encode: Callable[[str], list[int]]  # the model's own tokenizer: text -> ids, without BOS/EOS
    bos: int | None
    eos: int | None


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

    def accepts(self, path: Path) -> bool:
        raise NotImplementedError

    def require(self) -> None:
        if self.module and importlib.util.find_spec(self.module) is None:
            raise InputError(f"the {self.name} engine needs {self.module}",
                             hint=f"pip install -e '.[{self.extra}]'")

    def card(self, path: Path, trust_remote_code: bool = False) -> ModelCard:
        raise NotImplementedError

    def open(self, path: Path, *, device: str = "auto", dtype: str = "bfloat16", trust_remote_code: bool = False,
             qat_forward: bool = False, context: int | None = None) -> Session:
        raise NotImplementedError


# ---- transformers -------------------------------------------------------------------------------------
class _HFSession(Session):
    def __init__(self, loaded):
        self.loaded = loaded
        self.info, self.notes = loaded.info, loaded.notes

    def generate(self, prompts: list, **settings: Any) -> dict[str, Any]:
        from bitcpm_cli.core.generate import run_generation

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
        from bitcpm_cli.core.checkpoint import load_tokenizer, read_config

        if not path.is_dir():
            raise InputError(f"model folder not found ({path})", hint="pass a model folder or a .gguf file")
        config = read_config(path)
        tokenizer = load_tokenizer(path, trust_remote_code)
        width = config.get("vocab_size") or len(tokenizer)
        tokens: list[str | None] = [None] * max(width, len(tokenizer))
        for token, index in tokenizer.get_vocab().items():
            tokens[index] = token
        return ModelCard(str(path), tokens, config.get("max_position_embeddings"),
                         lambda text: tokenizer(text, add_special_tokens=False)["input_ids"],
                         tokenizer.bos_token_id, tokenizer.eos_token_id)

    def open(self, path: Path, *, device: str = "auto", dtype: str = "bfloat16", trust_remote_code: bool = False,
             qat_forward: bool = False, context: int | None = None) -> Session:
        from bitcpm_cli.core.generate import load_for_inference

        return _HFSession(load_for_inference(path, device=device, dtype=dtype, trust_remote_code=trust_remote_code,
                                             fuse_qat=not qat_forward))


# ---- llama.cpp -----------------------------------------------------------------------------------------
class _LlamaCppSession(Session):
    def __init__(self, path: Path, context: int | None):
        from bitcpm_cli.core import llamacpp

        self.path, self.notes = path, []
        self.llm = None  # generation opens the file itself (run_llamacpp); scoring needs logits of every position
        if context:
            self.llm = llamacpp.open_for_scoring(path, context)
            self.info = llamacpp.model_info(path, self.llm)

    def generate(self, prompts: list, **settings: Any) -> dict[str, Any]:
        from bitcpm_cli.core.llamacpp import run_llamacpp

        settings.pop("batch_size", None)
        return run_llamacpp(self.path, prompts, **settings)

    def score(self, ids: Sequence[int]):
        from bitcpm_cli.core.llamacpp import score_tokens

        return score_tokens(self.llm, ids)

    def close(self) -> None:
        if self.llm is not None:
            self.llm.close()
            self.llm = None


class LlamaCppEngine(Engine):
    name, extra, module = "llama.cpp", "gguf", "llama_cpp"

    def accepts(self, path: Path) -> bool:
        return path.suffix == ".gguf"

    def card(self, path: Path, trust_remote_code: bool = False) -> ModelCard:
        from bitcpm_cli.core.llamacpp import read_vocabulary

        self.require()
        tokens, max_context, vocab = read_vocabulary(path)
        return ModelCard(str(path), tokens, max_context,
                         lambda text: vocab.tokenize(text.encode(), add_bos=False, special=False),
                         vocab.token_bos(), vocab.token_eos())

    def open(self, path: Path, *, device: str = "auto", dtype: str = "bfloat16", trust_remote_code: bool = False,
             qat_forward: bool = False, context: int | None = None) -> Session:
        if device not in ("auto", "cpu"):
            raise InputError(f"the llama.cpp engine runs on the CPU, not {device}", hint="use --device cpu (or auto)")
        return _LlamaCppSession(path, context)


ENGINES: dict[str, Engine] = {"hf": HFEngine(), "llama.cpp": LlamaCppEngine()}


def engine_for(path: str | Path, name: str = "auto") -> Engine:
    """The engine named, or (auto) the first registered engine that accepts the path."""
    path = Path(path)
    if name != "auto":
        if name not in ENGINES:
            raise InputError(f"--engine {name!r} is not one of auto, {', '.join(ENGINES)}",
                             hint="auto picks llama.cpp for .gguf files and hf for model folders")
        return ENGINES[name]
    for engine in ENGINES.values():
        if engine.accepts(path):
            return engine
    if not path.exists():
        raise InputError(f"model folder not found ({path})", hint="pass a model folder or a .gguf file")
    raise InputError(f"no engine takes {path}", hint="pass a Hugging Face model folder or a .gguf file")


def generate(path: str | Path, prompts: list, *, engine: str = "auto", device: str = "auto",
             dtype: str = "bfloat16", trust_remote_code: bool = False, seed: int = 42,
             **settings: Any) -> dict[str, Any]:
    """`bitcpm infer`: open the model with its engine and generate for every prompt (a results document)."""
    chosen = engine_for(path, engine)
    chosen.require()
    session = chosen.open(Path(path), device=device, dtype=dtype, trust_remote_code=trust_remote_code)
    try:
        return session.generate(prompts, seed=seed, **settings)
    finally:
        session.close()
