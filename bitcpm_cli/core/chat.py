"""Chat rendering: the tokenizer's own chat template, or a documented default when it has none."""

from __future__ import annotations

from typing import Any

# ChatML, the format MiniCPM / BitCPM chat models use: <|im_start|>role\ncontent<|im_end|>\n
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
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
    from bitcpm_cli.core.readers import read_text_file

    return read_text_file(path, "chat template")
