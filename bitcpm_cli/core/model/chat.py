"""Chat rendering: the tokenizer's own chat template, or a documented default when it has none."""

from __future__ import annotations

from typing import Any

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
    tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    return True


CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>")


def end_of_turn_ids(tokenizer: Any) -> list[int]:
    """Ids of the end-of-turn tokens this tokenizer knows: generation of a chat reply stops at them."""
    vocab = tokenizer.get_vocab()
    return [vocab[token] for token in END_OF_TURN_TOKENS if token in vocab]


def load_template(template: str | None) -> str | None:
    """--template: None/'auto' keeps the tokenizer's own (ChatML if none), 'chatml' forces ChatML, else a .jinja file."""
    from pathlib import Path

    from bitcpm_cli.core.errors import InputError

    if template in (None, "auto"):
        return None
    if template == "chatml":
        return DEFAULT_CHAT_TEMPLATE
    path = Path(template)
    if not path.is_file():
        raise InputError(f"--template {template!r} is neither auto, chatml nor a file",
                         hint="pass auto, chatml, or the path of a Jinja chat template")
    from bitcpm_cli.core.io.readers import read_text_file

    return read_text_file(path, "chat template")
