"""Chat rendering: the tokenizer's own chat template, or a documented default when it has none."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bitcpm_cli.core.errors import InputError
from bitcpm_cli.core.io.readers import file_problem, read_text_file

# ChatML, the format MiniCPM / BitCPM chat models use: <|im_start|>role\ncontent<|im_end|>\n. Tools, tool calls and
# tool results are rendered as LLaMA-Factory's `qwen` template renders them (without Qwen's default system prompt):
# the tool list in the system turn, calls as <tool_call> JSON, results as a user turn of <tool_response> blocks.
TOOLS_PROMPT_HEAD = ("\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
                     "You are provided with function signatures within <tools></tools> XML tags:\n<tools>")
TOOLS_PROMPT_TAIL = ("\n</tools>\n\nFor each function call, return a json object with function name and arguments "
                     "within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, "
                     "\"arguments\": <args-json-object>}\n</tool_call>")
DEFAULT_CHAT_TEMPLATE = (
    "{% if tools %}{{ '<|im_start|>system\\n' }}"
    "{% if messages and messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}{% endif %}"
    "{{ " + repr(TOOLS_PROMPT_HEAD) + " }}"
    "{% for tool in tools %}{{ '\\n' + tool | tojson }}{% endfor %}"
    "{{ " + repr(TOOLS_PROMPT_TAIL + "<|im_end|>\n") + " }}{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' and tools and loop.first %}"
    "{% elif message['role'] == 'tool' %}"
    "{{ '<|im_start|>user\\n<tool_response>\\n' + message['content'] + '\\n</tool_response><|im_end|>\\n' }}"
    "{% elif message['tool_calls'] is defined and message['tool_calls'] %}{{ '<|im_start|>assistant\\n' }}"
    "{% for call in message['tool_calls'] %}{% if not loop.first %}{{ '\\n' }}{% endif %}"
    "{% set function = call['function'] if call['function'] is defined else call %}"
    "{{ '<tool_call>\\n{\"name\": ' + function['name'] | tojson + ', \"arguments\": ' + function['arguments'] | tojson"
    " + '}\\n</tool_call>' }}{% endfor %}{{ '<|im_end|>\\n' }}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def ensure_chat_template(tokenizer: Any) -> bool:
    """Give the tokenizer the default template if it has none; True when the default was applied."""
    if getattr(tokenizer, "chat_template", None):
        return False
    set_chat_template(tokenizer, DEFAULT_CHAT_TEMPLATE, DEFAULT_TEMPLATE_SOURCE)
    return True


CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>")


def end_of_turn_ids(tokenizer: Any) -> list[int]:
    """Ids of the end-of-turn tokens this tokenizer knows: generation of a chat reply stops at them."""
    vocab = tokenizer.get_vocab()
    return [vocab[token] for token in END_OF_TURN_TOKENS if token in vocab]


def load_template(template: str | None) -> str | None:
    """--template: None/'auto' keeps the tokenizer's own (ChatML if none), 'chatml' forces ChatML, else a .jinja file
    (compiled here: a broken one fails before anything else is read)."""
    if template in (None, "auto"):
        return None
    if template == "chatml":
        return DEFAULT_CHAT_TEMPLATE
    path = Path(template)
    if not path.exists():
        raise InputError(f"--template {template!r} is neither auto, chatml nor a file",
                         hint="pass auto, chatml, or the path of a Jinja chat template")
    if problem := file_problem(path, "--template file"):
        raise InputError(problem, hint="pass auto, chatml, or the path of a Jinja chat template")
    return compile_template(read_text_file(path, "chat template"), template_source(template))


# ---- where a template came from, and rendering it with its failures as input errors -------------------------------
DEFAULT_TEMPLATE_SOURCE = "bitcpm's default ChatML template"
TEMPLATE_HINT = ("fix the chat template (Jinja, rendered in transformers' sandbox) where the message says, or render "
                 "with another one (bitcpm sft takes --template chatml or --template FILE)")
_SOURCE_ATTRIBUTE = "bitcpm_chat_template_source"  # set by set_chat_template on the tokenizer it gives a template


def template_source(template: str | None) -> str | None:
    """Where --template's text comes from: None for auto (the tokenizer's own), else the default or the file."""
    if template in (None, "auto"):
        return None
    return DEFAULT_TEMPLATE_SOURCE if template == "chatml" else f"--template {template}"


def folder_template_source(folder: str | Path) -> str:
    """Where transformers reads a model folder's chat template from: chat_template.jinja before
    additional_chat_templates/*.jinja before tokenizer_config.json's `chat_template` (as AutoTokenizer loads it)."""
    folder = Path(folder)
    if (folder / "chat_template.jinja").is_file():
        return str(folder / "chat_template.jinja")
    extra = folder / "additional_chat_templates"
    if extra.is_dir() and any(extra.glob("*.jinja")):
        return f"{extra}/*.jinja"
    if (folder / "chat_template.json").is_file():
        return f"{folder / 'chat_template.json'}'s chat_template"
    return f"{folder / 'tokenizer_config.json'}'s chat_template"


def set_chat_template(tokenizer: Any, template: str, source: str) -> None:
    """Give the tokenizer a chat template and remember where it came from (for error messages)."""
    tokenizer.chat_template = template
    setattr(tokenizer, _SOURCE_ATTRIBUTE, source)


def chat_template_source(tokenizer: Any) -> str:
    """Where the tokenizer's chat template came from: as set_chat_template recorded it, else its model folder's file."""
    recorded = getattr(tokenizer, _SOURCE_ATTRIBUTE, None)
    if recorded:
        return recorded
    if getattr(tokenizer, "chat_template", None) == DEFAULT_CHAT_TEMPLATE:
        return DEFAULT_TEMPLATE_SOURCE
    return folder_template_source(getattr(tokenizer, "name_or_path", "") or ".")


def _template_line(exc: BaseException) -> int | None:
    """The template line an error points at: a syntax error's own, else the last template frame of the traceback
    (Jinja rewrites tracebacks so that template code shows as frames of the file `<template>`)."""
    line = getattr(exc, "lineno", None)
    traceback, in_template = exc.__traceback__, None
    while traceback is not None:
        if traceback.tb_frame.f_code.co_filename == "<template>":
            in_template = traceback.tb_lineno
        traceback = traceback.tb_next
    return line if isinstance(line, int) else in_template


def _raised_by_template(exc: BaseException) -> bool:
    import jinja2

    return isinstance(exc, jinja2.exceptions.TemplateError) or _template_line(exc) is not None


def template_failure(exc: BaseException, source: str) -> InputError:
    """The input error for a template that failed to compile or render: its source, the line, its own message."""
    text = " ".join((getattr(exc, "message", None) or str(exc)).split())
    text = text if len(text) <= 300 else text[:297] + "..."
    line = _template_line(exc)
    where = f" at line {line}" if line is not None else ""
    return InputError(f"the chat template from {source} failed{where}: {type(exc).__name__}: {text}".rstrip(": "),
                      hint=TEMPLATE_HINT)


@contextmanager
def template_errors(source: str) -> Iterator[None]:
    """Around compiling or rendering a chat template: what the template raised (a Jinja syntax error, a sandbox
    refusal, `raise_exception(...)`, an undefined value or a Python error inside its code) becomes an InputError
    naming `source`; an error raised outside the template's code (a bug) passes through as it is."""
    try:
        yield
    except Exception as exc:  # MemoryError and RecursionError too, when the template's own code raised them
        if not _raised_by_template(exc):
            raise
        raise template_failure(exc, source) from None


def compile_template(template: Any, source: str) -> str:
    """Compile a chat template once, as transformers does (its sandboxed environment, cached there for rendering):
    a template that is not a string or does not parse is an InputError naming `source`, before any model loads."""
    if not isinstance(template, str):
        raise InputError(f"the chat template from {source} is not a string but {type(template).__name__}",
                         hint="a chat template is Jinja text (or, in tokenizer_config.json, a list of "
                              "{\"name\", \"template\"} objects)")
    from transformers.utils.chat_template_utils import _compile_jinja_template

    with template_errors(source):
        _compile_jinja_template(template)
    return template


def check_chat_template(tokenizer: Any) -> str:
    """Compile the template apply_chat_template will render for this tokenizer (its choice among named ones);
    returns where it came from. Every failure is an InputError naming that source."""
    source = chat_template_source(tokenizer)
    try:
        template = tokenizer.get_chat_template()
    except ValueError as exc:
        raise InputError(f"no usable chat template in {source}: {' '.join(str(exc).split())[:300]}",
                         hint=TEMPLATE_HINT) from None
    compile_template(template, source)
    return source


def render_chat(tokenizer: Any, messages: list[dict[str, Any]], *, source: str | None = None, **kwargs: Any) -> str:
    """The tokenizer's chat template rendered as text (apply_chat_template's keywords: add_generation_prompt, tools,
    ...); a failure of the template is an InputError naming `source` (default: where the template came from)."""
    with template_errors(source or chat_template_source(tokenizer)):
        return tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)


def render_template(template: str | None, messages: list[dict[str, Any]], *, source: str, **kwargs: Any) -> str:
    """A template's text rendered by transformers' own renderer (its sandbox, `raise_exception`, `strftime_now`, loop
    controls), as apply_chat_template renders it, for engines that have no transformers tokenizer; None renders
    bitcpm's default. A failure of the template is an InputError naming `source`."""
    from transformers.utils.chat_template_utils import render_jinja_template

    if template is None:
        template, source = DEFAULT_CHAT_TEMPLATE, DEFAULT_TEMPLATE_SOURCE
    compile_template(template, source)
    with template_errors(source):
        rendered, _ = render_jinja_template([messages], chat_template=template, **kwargs)
    return rendered[0]
