"""Prompts for `bitcpm infer`: from --prompt, or a file (.txt one a line, .jsonl / .json with `prompt` or `messages`),
and their token ids as every transformers-tokenizer engine (hf, vllm) encodes them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bitcpm_cli.core.engines.base import Prompt
from bitcpm_cli.core.errors import InputError
from bitcpm_cli.core.io.readers import file_problem, json_records, read_text_file
from bitcpm_cli.core.model.chat import render_chat


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
    if problem := file_problem(path, "prompts file"):
        raise InputError(problem, hint="pass a .txt (one prompt a line) or .jsonl / .json file")
    if path.suffix in (".jsonl", ".json"):
        result = [_prompt_from_json(obj, i, where) for i, (where, obj) in enumerate(json_records(path, "prompts"))]
    else:
        lines = read_text_file(path, "prompts file").splitlines()
        result = [Prompt(i, text=line) for i, line in enumerate(line for line in lines if line.strip())]
    if not result:
        raise InputError(f"the prompts file holds no prompts ({path})", hint="add one prompt a line")
    return result


def encode_prompt(tokenizer, prompt: Prompt, chat: bool) -> list[int]:
    """A prompt's token ids as the engines that run a transformers tokenizer (hf, vllm) feed them: the chat template
    rendered (`chat`), else the text with the tokenizer's special tokens (BOS); an empty encoding is refused."""
    if chat:
        messages = prompt.messages or [{"role": "user", "content": prompt.text}]
        text = render_chat(tokenizer, messages, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    elif prompt.text is None:
        raise InputError(f"prompt {prompt.id} has messages but --chat was not given",
                         hint="pass --chat to render messages with the chat template")
    else:
        ids = tokenizer(prompt.text)["input_ids"]
    if not ids:  # nothing to condition on: generate() would fail deep inside the engine
        raise InputError(f"prompt {prompt.id} encodes to no tokens" + (" (the chat template rendered an empty text)"
                                                                       if chat else ""),
                         hint="give a non-empty prompt" + (", or fix the chat template" if chat else ""))
    return ids
