"""Chat data as LLaMA-Factory reads it: Alpaca, ShareGPT and OpenAI records, with dataset_info.json column mappings.

Every record becomes one conversation in the transformers chat format: messages with roles system / user /
assistant / tool (assistant turns may carry `tool_calls`), plus the record's tool definitions. The conversion follows
LLaMA-Factory's converters (src/llamafactory/data/converter.py):

- Alpaca: `history` pairs become earlier user/assistant turns; the user turn is `instruction` and `input` joined with
  one newline (empty parts left out); `system` and `tools` are used when present.
- ShareGPT: a leading `system` turn, else the record's top-level `system`; turns alternate human|observation and
  gpt|function_call; `function_call` content is a JSON call (or a list of calls) and `observation` a tool result.
- OpenAI: `tool_calls` on an assistant turn make it a function-call turn; consecutive `tool` messages are merged into
  one observation, joined as LLaMA-Factory joins them.

Where LLaMA-Factory skips an abnormal record with a log warning, bitcpm counts it and reports the first places; fields
it cannot use are counted and reported; media and preference fields (text-only SFT) are refused.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bitcpm_cli.core.errors import BitcpmError, InputError
from bitcpm_cli.core.io.readers import file_problem, json_records, read_json_file, read_text_file

FORMATS = ("auto", "alpaca", "sharegpt", "openai", "messages")  # messages: the OpenAI format's old name here
COLUMN_KEYS = ("prompt", "query", "response", "history", "messages", "system", "tools")
TAG_KEYS = ("role_tag", "content_tag", "user_tag", "assistant_tag", "observation_tag", "function_tag", "system_tag")
REFUSED = ("images", "videos", "audios", "chosen", "rejected", "kto_tag")  # LLaMA-Factory's media / preference data
ALPACA_COLUMNS = {"prompt": "instruction", "query": "input", "response": "output", "history": "history",
                  "system": "system", "tools": "tools"}
SHAREGPT_TAGS = {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt",
                 "observation_tag": "observation", "function_tag": "function_call", "system_tag": "system"}
OPENAI_TAGS = {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant",
               "observation_tag": "tool", "function_tag": "function_call", "system_tag": "system"}
TOOL_RESPONSE_JOIN = "\n</tool_response>\n<tool_response>\n"  # LLaMA-Factory's join of consecutive tool messages


@dataclass
class Conversation:
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None = None


@dataclass
class ChatData:
    conversations: list[Conversation]
    formats: dict[str, str]
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> records
    skipped_where: list[str] = field(default_factory=list)  # `file:line: reason` of every skipped record
    ignored_fields: dict[str, int] = field(default_factory=dict)  # field -> records that had it


class _Skip(Exception):
    """A record LLaMA-Factory would skip as abnormal: counted and reported, never silently lost."""


@dataclass
class Mapping:
    """dataset_info.json's `columns` and `tags` for one file (LLaMA-Factory's defaults where not given)."""

    formatting: str | None = None
    columns: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)


def parse_columns(items: list[str], data_files: list[str]) -> dict[str, Mapping]:
    """`--columns`: KEY=FIELD pairs (column or tag names) for every file, or a dataset_info.json.

    A dataset_info.json maps each data file by its `file_name` (a data file it does not list is an error), or is one
    entry (`columns` / `tags` / `formatting`) for every file. Entry settings bitcpm cannot honour are errors.
    """
    shared, by_file, problems = Mapping(), {}, []
    for item in items:
        if "=" in item:
            key, _, name = item.partition("=")
            key, name = key.strip(), name.strip()
            if key == "formatting":
                shared.formatting = name
            elif key in COLUMN_KEYS:
                shared.columns[key] = name
            elif key in TAG_KEYS:
                shared.tags[key] = name
            else:
                problems.append(f"columns: {key!r} is not one of formatting, {', '.join(COLUMN_KEYS + TAG_KEYS)}")
            continue
        path = Path(item)
        if not path.is_file():
            problems.append(f"columns: {item!r} is neither KEY=FIELD nor a dataset_info.json file")
            continue
        try:
            info = read_json_file(path, "dataset_info.json")
        except BitcpmError as exc:
            problems.append(f"columns: {exc.message}")
            continue
        if not isinstance(info, dict):
            problems.append(f"columns: {path} is not a dataset_info.json (a JSON object)")
            continue
        if "columns" in info or "tags" in info or "formatting" in info:  # one entry: it applies to every file
            shared = _entry_mapping(info, f"{path}", problems)
            continue
        for name, entry in info.items():
            if isinstance(entry, dict) and "file_name" in entry:
                where = f"{path} entry {name!r}"
                if not isinstance(entry["file_name"], str) or not entry["file_name"]:
                    problems.append(f"columns: {where}: file_name must be a file name (a string), got "
                                    f"{type(entry['file_name']).__name__}")
                    continue
                unsupported = sorted(set(entry) - {"file_name", "formatting", "columns", "tags", "file_sha1"})
                if unsupported:
                    problems.append(f"columns: {entry['file_name']}: {', '.join(unsupported)} not supported by bitcpm "
                                    "sft (text-only supervised data, every record used)")
                by_file[Path(entry["file_name"]).name] = _entry_mapping(entry, where, problems)
        unlisted = [name for name in data_files if Path(name).name not in by_file]
        if unlisted:
            problems.append(f"columns: {path} has no entry whose file_name is {Path(unlisted[0]).name}")
    for mapping in [shared, *by_file.values()]:
        for key in mapping.columns:
            if key not in COLUMN_KEYS + REFUSED:
                problems.append(f"columns: unknown column key {key!r} (known: {', '.join(COLUMN_KEYS)})")
        for key in mapping.tags:
            if key not in TAG_KEYS:
                problems.append(f"columns: unknown tag key {key!r} (known: {', '.join(TAG_KEYS)})")
        for key in REFUSED:
            if key in mapping.columns:
                problems.append(f"columns: {key!r} data is not supported (bitcpm sft trains text-only supervised data)")
        if mapping.formatting not in (None, "alpaca", "sharegpt", "openai"):
            problems.append(f"columns: formatting {mapping.formatting!r} is not alpaca, sharegpt or openai")
    if problems:
        raise InputError(problems[0], hint="e.g. --columns prompt=question --columns response=answer, or "
                                          "--columns data/dataset_info.json", problems=problems[1:])
    return {name: by_file.get(Path(name).name, shared) for name in data_files}


def _entry_mapping(entry: dict[str, Any], where: str, problems: list[str]) -> Mapping:
    """One dataset_info.json entry's formatting / columns / tags, each of the shape LLaMA-Factory reads (a string;
    objects of string to string); a part of another shape is a problem naming the entry, and is left out."""
    formatting = entry.get("formatting")
    if formatting is not None and not isinstance(formatting, str):
        problems.append(f"columns: {where}: formatting must be a string, got {type(formatting).__name__}")
        formatting = None
    parts = []
    for key in ("columns", "tags"):
        part = entry.get(key, {})
        if part is None:
            part = {}
        if not isinstance(part, dict) or not all(isinstance(v, str) for v in part.values()):
            shown = type(part).__name__ if not isinstance(part, dict) else "an object with non-string values"
            problems.append(f"columns: {where}: {key} must be an object of field names (strings), got {shown}")
            part = {}
        parts.append(dict(part))
    return Mapping(formatting, *parts)


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise _Skip(f"{what} is not a string")
    return value


def _tools(value: Any) -> list[dict[str, Any]] | None:
    """LLaMA-Factory's tools: a JSON string or list of function definitions, wrapped as {type: function, ...}."""
    if value in (None, "", []):
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise _Skip("tools is not valid JSON") from None
    value = value if isinstance(value, list) else [value]
    if not all(isinstance(tool, dict) for tool in value):
        raise _Skip("tools must be function definitions (JSON objects)")
    return [tool if tool.get("type") == "function" else {"type": "function", "function": tool} for tool in value]


def _calls(content: Any) -> list[dict[str, Any]]:
    """A function_call turn's content (JSON {name, arguments} or a list of them) as transformers tool_calls."""
    try:
        calls = json.loads(content) if isinstance(content, str) else content
    except json.JSONDecodeError:
        raise _Skip("function_call content is not valid JSON") from None
    calls = calls if isinstance(calls, list) else [calls]
    if not calls or not all(isinstance(c, dict) and "name" in c and "arguments" in c for c in calls):
        raise _Skip('function_call content must be {"name": ..., "arguments": ...} (or a list of them)')
    return [{"type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}} for c in calls]


def _alpaca(record: dict[str, Any], columns: dict[str, str]) -> tuple[Conversation, set[str]]:
    c = {**ALPACA_COLUMNS, **columns}
    messages: list[dict[str, Any]] = []
    system = record.get(c["system"])
    if system:
        messages.append({"role": "system", "content": _text(system, c["system"])})
    history = record.get(c["history"])
    if history not in (None, []):
        if not isinstance(history, list) or not all(isinstance(p, list) and len(p) == 2 for p in history):
            raise _Skip(f"{c['history']} must be a list of [prompt, response] pairs")
        for old_prompt, old_response in history:
            messages += [{"role": "user", "content": _text(old_prompt, c["history"])},
                         {"role": "assistant", "content": _text(old_response, c["history"])}]
    query = [_text(record[c[key]], c[key]) for key in ("prompt", "query") if record.get(c[key])]
    messages.append({"role": "user", "content": "\n".join(query)})
    messages.append({"role": "assistant", "content": _text(record.get(c["response"]), c["response"])})
    used = {c[key] for key in ALPACA_COLUMNS}
    return Conversation(messages, _tools(record.get(c["tools"]))), used


def _turns(record: dict[str, Any], columns: dict[str, str], tags: dict[str, str], openai: bool):
    """LLaMA-Factory's Sharegpt / OpenAI converters; yields the conversation and the fields it used."""
    name = columns.get("messages", "messages" if openai else "conversations")
    turns = record.get(name)
    if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
        raise _Skip(f"{name} is not a list of turns")
    role, content = tags["role_tag"], tags["content_tag"]
    system_name = columns.get("system", "system")
    system = record.get(system_name) or ""
    if turns and turns[0].get(role) == tags["system_tag"]:
        system, turns = _text(turns[0].get(content), "the system turn"), turns[1:]
    aligned: list[dict[str, Any]] = []
    pending_tool: list[str] = []
    extra: Counter = Counter()
    for turn in turns:
        extra.update(f"{name}[].{key}" for key in turn if key not in (role, content, "tool_calls"))
        kind = turn.get(role)
        if openai and kind == tags["observation_tag"]:
            pending_tool.append(_text(turn.get(content), "a tool message's content"))
            continue
        if pending_tool:
            aligned.append({"role": "tool", "content": TOOL_RESPONSE_JOIN.join(pending_tool)})
            pending_tool = []
        if openai and kind == tags["assistant_tag"] and turn.get("tool_calls"):
            if turn.get(content):
                raise _Skip("an assistant turn has both text and tool_calls (LLaMA-Factory keeps only the calls)")
            calls = turn["tool_calls"]
            if not isinstance(calls, list) or not all(isinstance(c, dict) and isinstance(c.get("function"), dict)
                                                      for c in calls):
                raise _Skip("tool_calls must be a list of {type: function, function: {name, arguments}}")
            aligned.append({"role": "assistant", "content": "",
                            "tool_calls": _calls([c["function"] for c in calls])})
            continue
        mapped = {tags["user_tag"]: "user", tags["assistant_tag"]: "assistant", tags["observation_tag"]: "tool",
                  tags["function_tag"]: "function_call"}.get(kind)
        if mapped is None:
            raise _Skip(f"unknown role {kind!r}")
        text = turn.get(content)
        if mapped == "function_call":
            aligned.append({"role": "assistant", "content": "", "tool_calls": _calls(text)})
        else:
            aligned.append({"role": mapped, "content": _text(text, f"a {kind} turn's {content}")})
    if pending_tool:
        aligned.append({"role": "tool", "content": TOOL_RESPONSE_JOIN.join(pending_tool)})
    for index, message in enumerate(aligned):
        expected = ("user", "tool") if index % 2 == 0 else ("assistant",)
        if message["role"] not in expected:
            raise _Skip(f"turn {index + 1} is {message['role']} where {' or '.join(expected)} is expected "
                        "(turns must alternate)")
    if len(aligned) % 2:
        raise _Skip("the last turn is not an assistant turn")
    messages = ([{"role": "system", "content": _text(system, system_name)}] if system else []) + aligned
    tools_name = columns.get("tools", "tools")
    return Conversation(messages, _tools(record.get(tools_name))), {name, system_name, tools_name}, extra


def detect(record: Any, mapping: Mapping) -> str | None:
    """alpaca, sharegpt or openai, from the record's fields (after the column mapping)."""
    if mapping.formatting:
        return mapping.formatting
    if not isinstance(record, dict):
        return None
    turns = record.get(mapping.columns.get("messages", "")) or record.get("messages") or record.get("conversations")
    if isinstance(turns, list) and turns and isinstance(turns[0], dict):
        if mapping.tags.get("role_tag") in turns[0]:
            return "openai" if mapping.tags["role_tag"] == "role" else "sharegpt"
        return "openai" if "role" in turns[0] else "sharegpt" if "from" in turns[0] else None
    prompt = mapping.columns.get("prompt", "instruction")
    response = mapping.columns.get("response", "output")
    return "alpaca" if prompt in record and response in record else None


class RecordLines:
    """`file:line` for a record of a .json list (whose readers name it `file[index]`): the line its element starts
    on, found by decoding the list element by element only when a record is reported (a .jsonl place is kept)."""

    def __init__(self, path: Path):
        self.path, self._starts = path, None

    def place(self, where: str) -> str:
        prefix = f"{self.path}["
        if not (where.startswith(prefix) and where.endswith("]") and where[len(prefix):-1].isdigit()):
            return where
        if self._starts is None:
            self._starts = json_list_lines(read_text_file(self.path, "conversations"))
        index = int(where[len(prefix):-1])
        return f"{self.path}:{self._starts[index]}" if index < len(self._starts) else where


def json_list_lines(text: str) -> list[int]:
    """The 1-based line on which each element of a top-level JSON list starts (the text is known to parse)."""
    decoder, space = json.JSONDecoder(), " \t\r\n"
    position, line, counted, starts = text.index("[") + 1, 1, 0, []
    while True:
        while position < len(text) and text[position] in space + ",":
            position += 1
        if position >= len(text) or text[position] == "]":
            return starts
        line += text.count("\n", counted, position)
        counted = position
        starts.append(line)
        _, position = decoder.raw_decode(text, position)


def read_chat_data(paths: list[str], fmt: str = "auto", columns: list[str] = ()) -> ChatData:
    """Every conversation of every file; abnormal records and unused fields are counted, never silently dropped."""
    if fmt == "messages":
        fmt = "openai"
    mappings = parse_columns(list(columns), paths)
    data = ChatData([], {})
    skipped: Counter = Counter()
    ignored: Counter = Counter()
    for name in paths:
        path = Path(name)
        if problem := file_problem(path, "data file"):
            raise InputError(problem, hint="pass .json or .jsonl chat data")
        if path.suffix not in (".json", ".jsonl"):
            raise InputError(f"data file {path} is not .json or .jsonl", hint="chat data comes as JSON lines or a list")
        mapping = mappings[name]
        located = json_records(path, "conversations")
        lines = RecordLines(path)
        file_format = mapping.formatting or fmt
        if file_format == "auto" and located:
            file_format = detect(located[0][1], mapping)
            if file_format is None:
                raise InputError(f"{located[0][0]}: cannot tell the chat format",
                                 hint="records need 'messages', 'conversations' or 'instruction'/'output' "
                                      "(or map your fields with --columns)")
        data.formats[str(path)] = file_format
        for where, record in located:
            if not isinstance(record, dict):
                raise InputError(f"{where}: expected a JSON object", hint="one conversation per line (or list item)")
            refused = [key for key in REFUSED if record.get(mapping.columns.get(key, key)) not in (None, "", [])]
            if refused:
                raise InputError(f"{where}: {', '.join(refused)} data is not supported",
                                 hint="bitcpm sft trains text-only supervised data; drop these fields")
            try:
                if file_format == "alpaca":
                    if not isinstance(record.get(mapping.columns.get("prompt", "instruction")), str):
                        raise InputError(f"{where}: alpaca records need 'instruction' and 'output' strings",
                                         hint='e.g. {"instruction": "...", "input": "", "output": "..."}')
                    conversation, used = _alpaca(record, mapping.columns)
                    extra: Counter = Counter()
                else:
                    defaults = OPENAI_TAGS if file_format == "openai" else SHAREGPT_TAGS
                    conversation, used, extra = _turns(record, mapping.columns, {**defaults, **mapping.tags},
                                                       file_format == "openai")
            except _Skip as skip:
                skipped[str(skip)] += 1
                data.skipped_where.append(f"{lines.place(where)}: {skip}")
                continue
            ignored.update(key for key in record if key not in used and key not in REFUSED)
            ignored.update(extra)
            data.conversations.append(conversation)
    data.skipped, data.ignored_fields = dict(skipped), dict(ignored)
    return data
