"""The engine registry: one line per engine in `ENGINES`; `engine_for(path)` picks the engine named, or the first that
accepts the path. `infer`, `eval` and `quickstart` ask it; adding an engine is one module with an `Engine` subclass
and one line here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bitcpm_cli.core.engines.base import Engine
from bitcpm_cli.core.engines.hf import HFEngine, require_model_folder
from bitcpm_cli.core.engines.llamacpp import LlamaCppEngine
from bitcpm_cli.core.engines.vllm import VLLMEngine, refuse_non_folder
from bitcpm_cli.core.errors import InputError

ENGINES: dict[str, Engine] = {"hf": HFEngine(), "llama.cpp": LlamaCppEngine(), "vllm": VLLMEngine()}


def engine_for(path: str | Path, name: str = "auto") -> Engine:
    """The engine named, or (auto) the first registered engine that accepts the path."""
    path = Path(path)
    if name != "auto":
        if name not in ENGINES:
            raise InputError(f"--engine {name!r} is not one of auto, {', '.join(ENGINES)}",
                             hint="auto picks llama.cpp for .gguf files and hf for model folders; vllm runs only "
                                  "when named")
        if name == "hf":
            require_model_folder(path)  # a .gguf file is named as such, with the engine that runs it
        if name == "vllm":
            refuse_non_folder(path)  # vllm is never picked by auto: only named
        return ENGINES[name]
    for engine in ENGINES.values():
        if engine.accepts(path):
            return engine
    if not path.exists():
        raise InputError(f"model folder not found ({path})", hint="pass a model folder or a .gguf file")
    raise InputError(f"no engine takes {path}", hint="pass a Hugging Face model folder or a .gguf file")


def generate(path: str | Path, prompts: list, *, engine: str = "auto", device: str = "auto",
             dtype: str = "bfloat16", trust_remote_code: bool = False, seed: int = 42,
             activations: str | None = None, **settings: Any) -> dict[str, Any]:
    """`bitcpm infer`: open the model with its engine and generate for every prompt (a results document);
    `activations` overrides the model's activation scheme (an engine that cannot run it refuses)."""
    chosen = engine_for(path, engine)
    chosen.require()
    chosen.check_activations(Path(path), activations)  # before the weights load
    if settings.get("chat"):  # a broken chat template fails here, before the weights load
        chosen.check_chat_template(Path(path), trust_remote_code)
    session = chosen.open(Path(path), device=device, dtype=dtype, trust_remote_code=trust_remote_code,
                          activations=activations)
    try:
        return session.generate(prompts, seed=seed, **settings)
    finally:
        session.close()
