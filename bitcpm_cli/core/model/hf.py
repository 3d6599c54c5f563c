"""Loading with transformers, safely: the dtypes bitcpm loads and writes, the `dtype` / `torch_dtype` keyword, the refusal
of a folder's own code unless --trust-remote-code, the tokenizer loader, and transformers' logging quieted for the
length of a call (and restored after it).
"""

from __future__ import annotations

import importlib
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from bitcpm_cli.core.errors import InputError
from bitcpm_cli.core.model.checkpoint import read_json

DTYPES = ("bfloat16", "float16", "float32")


def dtype_kwarg() -> str:
    """transformers renamed from_pretrained's `torch_dtype` to `dtype` in 4.56."""
    import transformers
    from packaging.version import Version

    return "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"


REMOTE_CODE_HINT = ("bitcpm never runs a model folder's own Python code unless asked: read its .py files, and pass "
                    "--trust-remote-code only if you trust them")


def _asks_for_code(path: Path) -> str | None:
    for name in ("config.json", "tokenizer_config.json"):
        file = path / name
        if file.is_file():
            data = read_json(file, name)
            if isinstance(data, dict) and data.get("auto_map"):
                return f"{file} maps classes to the folder's own code (auto_map)"
    return None


def refuse_remote_code(path: str | Path, hint: str = REMOTE_CODE_HINT) -> None:
    """For readers that never run remote code (and libraries that might prompt for it): refuse such a folder."""
    reason = _asks_for_code(Path(path)) if Path(path).is_dir() else None
    if reason:
        raise InputError(f"refusing to load {path}: {reason}", hint=hint)


@contextmanager
def hf_loading(path: str | Path) -> Iterator[None]:
    """Around a transformers load with trust_remote_code=False: a folder that needs its own code is exit 2."""
    try:
        yield
    except ValueError as exc:
        text = str(exc)
        if "custom code" in text or "trust_remote_code" in text:
            reason = _asks_for_code(Path(path)) or "it needs its own Python code"
            raise InputError(f"refusing to load {path}: {reason}", hint=REMOTE_CODE_HINT) from None
        raise


def load_tokenizer(path: str | Path, trust_remote_code: bool = False, padding_side: str = "right"):
    """The model folder's tokenizer (local files only), with a pad token."""
    from transformers import AutoTokenizer

    if not Path(path).is_dir():
        raise InputError(f"tokenizer folder not found ({path})", hint="pass the model or tokenizer folder")
    try:
        with hf_loading(path):
            tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError) as exc:
        raise InputError(f"no usable tokenizer in {path} ({str(exc).splitlines()[0][:160]})",
                         hint="copy the tokenizer files (tokenizer.json / tokenizer.model, tokenizer_config.json) "
                              "into the model folder") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = padding_side
    return tokenizer


@contextmanager
def quiet_transformers(verbosity_error: bool = False) -> Iterator[None]:
    """transformers' progress bars off (with verbosity_error, its warnings too) for the length of the block, then both
    put back as they were, also when the block raises: bitcpm's commands draw their own output, and a library caller
    keeps its own logging settings."""
    from transformers.utils import logging as hf_logging

    hub_states = getattr(importlib.import_module("huggingface_hub.utils.tqdm"), "progress_bar_states", {})
    enabled, verbosity, hub_saved = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity(), dict(hub_states)
    hf_logging.disable_progress_bar()  # huggingface_hub's bars too
    if verbosity_error:
        hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if hf_logging.is_progress_bar_enabled() != enabled:
            (hf_logging.enable_progress_bar if enabled else hf_logging.disable_progress_bar)()
        hub_states.clear()  # transformers' switch sets huggingface_hub's global state: put back its groups as found
        hub_states.update(hub_saved)
