"""Loading with transformers, safely: the dtypes bitcpm loads and writes, the `dtype` / `torch_dtype` keyword, the refusal
of a folder's own code unless --trust-remote-code, the tokenizer loader, and transformers' logging quieted for the
length of a call (and restored after it).
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

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


def _auto_map_code(config: dict, folder: Path) -> tuple[bool, list[str]]:
    """(whether config.json's auto_map names the classes AutoModelForCausalLM needs, the local code files it names
    that the folder lacks). A `repo--module.Class` entry names another repository's code: not a local file."""
    auto_map = config.get("auto_map")
    if not isinstance(auto_map, dict):
        return False, []
    wanted = [auto_map.get(name) for name in ("AutoConfig", "AutoModelForCausalLM")]
    names = [item[0] if isinstance(item, list) and item else item for item in wanted]
    if not all(isinstance(name, str) and "." in name for name in names):
        return False, []
    missing = [f"{name.rsplit('.', 1)[0]}.py" for name in names
               if "--" not in name and not (folder / f"{name.rsplit('.', 1)[0]}.py").is_file()]
    return True, sorted(set(missing))


def check_model_type(path: str | Path) -> None:
    """A model folder's config.json names a `model_type` that transformers can build a causal LM for, or maps its
    classes to the folder's own code (auto_map, loaded only with --trust-remote-code) that is there: anything else
    is an InputError naming the model_type and config.json, before anything is loaded."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from bitcpm_cli.core.errors import did_you_mean

    file = Path(path) / "config.json"
    if not file.is_file():
        return  # no config: the loader's own message names what is missing
    config = read_json(file, "config.json")
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type is None:
        return
    mapped, missing = _auto_map_code(config, Path(path))
    if missing:
        raise InputError(f"{file} maps model_type {model_type!r} to the folder's own code, but {', '.join(missing)} "
                         f"{'is' if len(missing) == 1 else 'are'} not in {path}", hint="copy the model's .py files into the folder (and pass "
                                                   "--trust-remote-code only if you trust them)")
    if mapped or (isinstance(model_type, str) and model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES):
        return
    import transformers

    if not isinstance(model_type, str):
        reason = f"it must be a string, not {type(model_type).__name__}"
    elif model_type in CONFIG_MAPPING_NAMES:
        reason = f"transformers {transformers.__version__} has no causal language model for it"
    else:
        reason = f"transformers {transformers.__version__} does not know it"
    raise InputError(
        f"{file}: model_type {model_type!r} cannot be loaded: {reason}"
        f"{did_you_mean(str(model_type), MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)}",
        hint=f"use one of the {len(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)} causal-LM model types transformers knows "
             f"(e.g. llama, mistral, qwen2), or, for a model with its own code, an auto_map in config.json and the "
             f"folder's .py files, loaded with --trust-remote-code")


@contextmanager
def hf_loading(path: str | Path, model: bool = True) -> Iterator[None]:
    """Around a transformers load with trust_remote_code=False: a folder that needs its own code is exit 2. With
    `model` (a model, not only a tokenizer, is loaded), config.json's model_type is checked first (check_model_type).
    """
    if model:
        check_model_type(path)
    try:
        yield
    except ValueError as exc:
        text = str(exc)
        if "custom code" in text or "trust_remote_code" in text:
            reason = _asks_for_code(Path(path)) or "it needs its own Python code"
            raise InputError(f"refusing to load {path}: {reason}", hint=REMOTE_CODE_HINT) from None
        raise


def _check_template_entries(folder: Path) -> None:
    """tokenizer_config.json's `chat_template` as a list must be {"name", "template"} objects (transformers fails on
    anything else while loading the tokenizer); other values are checked where a template is used."""
    file = folder / "tokenizer_config.json"
    data = read_json(file, "tokenizer_config.json") if file.is_file() else None
    entries = data.get("chat_template") if isinstance(data, dict) else None
    if isinstance(entries, list) and not all(isinstance(entry, dict) and isinstance(entry.get("name"), str)
                                             and isinstance(entry.get("template"), str) for entry in entries):
        raise InputError(f"{file}'s chat_template is a list whose entries are not all {{\"name\": text, "
                         "\"template\": text}} objects",
                         hint="give chat_template as Jinja text, or a list of named templates as transformers "
                              "saves them")


def load_tokenizer(path: str | Path, trust_remote_code: bool = False, padding_side: str = "right"):
    """The model folder's tokenizer (local files only), with a pad token."""
    from transformers import AutoTokenizer

    if not Path(path).is_dir():
        raise InputError(f"tokenizer folder not found ({path})", hint="pass the model or tokenizer folder")
    _check_template_entries(Path(path))
    try:
        # transformers' warnings while it reads config.json for the tokenizer class ("a model of type minicpm to
        # instantiate a model of type ``" for a type it lacks) say nothing about the tokenizer: kept off stderr
        with hf_loading(path, model=False), quiet_transformers(verbosity_error=True):
            tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError) as exc:
        check_model_type(path)  # a tokenizer that needs config.json's (unknown) model_type: name that instead
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
