"""One careful reader per input kind: every file bitcpm reads goes through here.

- JSON (`read_json_file`, `parse_json`): size limit, nesting depth limit, integers of at most MAX_INT_DIGITS digits,
  no NaN / Infinity, errors as `file, line L column C` or the field.
- Text (`read_text_file`, `iter_text_lines`): UTF-8 only, a bad byte is reported as `file:line`.
- YAML (`read_yaml_file`, `parse_yaml`): safe loader, aliases allowed only while the document they expand to stays
  under MAX_YAML_NODES nodes (an alias bomb is refused before it is built).
- Structured files (`read_structured_file`): JSON or YAML by extension.
- Safetensors headers (`check_safetensors_header`): every entry's dtype, shape and offsets; offsets in range,
  tensors not overlapping, shape x dtype size == bytes.
- Results files (`read_results`): schema bitcpm.results/1 (or a bare list of results) checked field by field.

Every problem is a BitcpmError (exit 2) that names the file and the line or field.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

from bitcpm_cli.core.errors import BitcpmError, ConfigError, InputError

MAX_JSON_BYTES = 2 * 2**30
MAX_JSON_DEPTH = 64
MAX_INT_DIGITS = 40  # a 128-bit integer has 39 digits
MAX_YAML_NODES = 100_000
RESULTS_SCHEMA = "bitcpm.results/1"
MAX_TOKEN_ID = 2**31 - 1
UTF8_HINT = "save the file as UTF-8"


class _Limit(Exception):
    """Raised from inside the JSON decoder's hooks; turned into an InputError with the location."""


def _parse_int(text: str) -> int:
    digits = len(text.lstrip("-"))
    if digits > MAX_INT_DIGITS:
        raise _Limit(f"an integer with {digits} digits (at most {MAX_INT_DIGITS} are accepted)")
    return int(text)


def _parse_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _Limit(f"the number {text[:40]} is out of range")
    return value


def _parse_constant(name: str) -> Any:
    raise _Limit(f"{name} is not valid JSON")


def _depth(value: Any) -> int:
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, level)
            if level > MAX_JSON_DEPTH:
                return level
            stack.extend((child, level + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


def parse_json(text: str | bytes, where: str, what: str = "JSON", error: type[BitcpmError] = InputError,
               line: bool = False) -> Any:
    """Parse JSON text; `where` names the file (`line`: `where` is already `file:line`, one JSON value a line)."""
    hint = "fix the JSON at that position"
    try:
        value = json.loads(text, parse_int=_parse_int, parse_float=_parse_float, parse_constant=_parse_constant)
    except json.JSONDecodeError as exc:
        if line:
            raise error(f"{where}: not valid JSON ({exc.msg}, column {exc.colno})",
                        hint="each line must be one JSON value") from None
        raise error(f"{what} is not valid JSON ({where}, line {exc.lineno} column {exc.colno}): {exc.msg}",
                    hint=hint) from None
    except _Limit as exc:
        raise error(f"{what} holds {exc} ({where})", hint=hint) from None
    except RecursionError:
        raise error(f"{what} is nested too deeply ({where}; at most {MAX_JSON_DEPTH} levels)", hint=hint) from None
    except UnicodeDecodeError as exc:
        raise error(f"{what} is not valid UTF-8 ({where}, byte {exc.start})", hint=UTF8_HINT) from None
    except ValueError as exc:  # e.g. a number the decoder cannot convert
        raise error(f"{what} is not valid JSON ({where}): {str(exc)[:120]}", hint=hint) from None
    if _depth(value) > MAX_JSON_DEPTH:
        raise error(f"{what} is nested too deeply ({where}; at most {MAX_JSON_DEPTH} levels)", hint=hint)
    return value


def read_bytes(path: str | Path, what: str, max_bytes: int | None = None) -> bytes:
    path = Path(path)
    try:
        size = path.stat().st_size
        if max_bytes is not None and size > max_bytes:
            raise InputError(f"{what} is too large: {size:,} bytes, at most {max_bytes:,} ({path})",
                             hint="check that this is the right file")
        return path.read_bytes()
    except FileNotFoundError:
        raise InputError(f"cannot read {what} ({path}): {what} not found", hint="check the path") from None
    except IsADirectoryError:
        raise InputError(f"{what} is a folder, not a file ({path})", hint="pass the file") from None
    except OSError as exc:
        raise InputError(f"cannot read {what} ({path}): {exc.strerror or exc}",
                         hint="check the file's permissions") from None


def decode_utf8(raw: bytes, where: str, what: str = "the file") -> str:
    """UTF-8 text (a leading BOM dropped); a bad byte is an InputError naming `where:line`."""
    try:
        return raw.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        raise InputError(f"{what} is not valid UTF-8 ({where}:{line}, column {column}: byte "
                         f"0x{raw[exc.start]:02x})", hint=UTF8_HINT) from None


def read_text_file(path: str | Path, what: str, max_bytes: int | None = None) -> str:
    return decode_utf8(read_bytes(path, what, max_bytes), str(path), what)


def iter_text_lines(path: str | Path, what: str = "the file") -> Iterator[tuple[int, str]]:
    """(line number, line without its newline), streaming; a bad UTF-8 byte names `file:line`."""
    path = Path(path)
    try:
        handle = path.open("rb")
    except OSError as exc:
        raise InputError(f"cannot read {what} ({path}): {exc.strerror or exc}", hint="check the path") from None
    with handle:
        for number, raw in enumerate(handle, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise InputError(f"{what} is not valid UTF-8 ({path}:{number}, column {exc.start + 1})",
                                 hint=UTF8_HINT) from None
            if number == 1:
                line = line.removeprefix("\ufeff")
            yield number, line.rstrip("\r\n")


def read_json_file(path: str | Path, what: str, max_bytes: int = MAX_JSON_BYTES,
                   error: type[BitcpmError] = InputError) -> Any:
    path = Path(path)
    return parse_json(read_text_file(path, what, max_bytes), str(path), what, error)


def read_json_lines(path: str | Path, what: str) -> Iterator[tuple[str, Any]]:
    """(`file:line`, value) of every non-blank line of a JSON-lines file."""
    for number, line in iter_text_lines(path, what):
        if line.strip():
            where = f"{path}:{number}"
            yield where, parse_json(line, where, what, line=True)


def json_records(path: Path, what: str = "records") -> list[tuple[str, Any]]:
    """(where, record) of a .jsonl file (one a line) or a .json list; `where` is `file:line` or `file[index]`."""
    if path.suffix == ".json":
        data = read_json_file(path, what)
        if not isinstance(data, list):
            raise InputError(f"{path}: expected a JSON list of {what}", hint="or use .jsonl, one a line")
        return [(f"{path}[{i}]", record) for i, record in enumerate(data)]
    return list(read_json_lines(path, what))


# ---- YAML ---------------------------------------------------------------------------------------------
def _expanded_size(node: Any, memo: dict[int, int]) -> int:
    key = id(node)
    if key in memo:
        return memo[key]
    memo[key] = MAX_YAML_NODES + 1  # a cycle counts as too large
    value = node.value
    size = 1
    if isinstance(value, list):
        for item in value:
            children = item if isinstance(item, tuple) else (item,)
            for child in children:
                size += _expanded_size(child, memo)
                if size > MAX_YAML_NODES:
                    break
    memo[key] = size
    return size


def parse_yaml(text: str, where: str, what: str = "YAML") -> Any:
    """Safe YAML; aliases are fine unless they expand the document beyond MAX_YAML_NODES nodes."""
    import yaml

    loader = None
    try:
        loader = yaml.SafeLoader(text)  # refuses control characters such as NUL already here
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_size(node, {}) > MAX_YAML_NODES:
            raise ConfigError(f"{what} expands to more than {MAX_YAML_NODES:,} values through its aliases "
                              f"({where})", hint="write the values out; alias bombs are refused")
        return loader.construct_document(node)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f", line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{what} is not valid YAML ({where}{at}): {problem}",
                          hint="fix the syntax at the position shown") from None
    except RecursionError:
        raise ConfigError(f"{what} is nested too deeply ({where})", hint="flatten the document") from None
    except (ValueError, OverflowError) as exc:  # e.g. an integer too long to convert
        raise ConfigError(f"{what} holds a value that cannot be read ({where}): {str(exc)[:120]}",
                          hint="fix the value") from None
    finally:
        if loader is not None:
            loader.dispose()


def read_yaml_file(path: str | Path, what: str, max_bytes: int = 64 * 2**20) -> Any:
    return parse_yaml(read_text_file(path, what, max_bytes), str(path), what)


def read_structured_file(path: str | Path, what: str) -> Any:
    """A JSON or YAML file (by extension), read with the limits above."""
    path = Path(path)
    if path.suffix.lower() in (".yaml", ".yml"):
        return read_yaml_file(path, what)
    return read_json_file(path, what, 64 * 2**20, error=ConfigError)


# ---- safetensors headers ------------------------------------------------------------------------------
# Every safetensors dtype bitcpm reads: (torch dtype name, bytes an element). The one table; checkpoint derives
# its name mapping from it.
SAFETENSORS_TYPES = {
    "F64": ("float64", 8), "F32": ("float32", 4), "F16": ("float16", 2), "BF16": ("bfloat16", 2),
    "F8_E4M3": ("float8_e4m3fn", 1), "F8_E5M2": ("float8_e5m2", 1), "I64": ("int64", 8), "I32": ("int32", 4),
    "I16": ("int16", 2), "I8": ("int8", 1), "U8": ("uint8", 1), "BOOL": ("bool", 1), "U16": ("uint16", 2),
    "U32": ("uint32", 4), "U64": ("uint64", 8),
}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_safetensors_header(header: Any, data_bytes: int, path: Path) -> dict[str, dict[str, Any]]:
    """The tensor entries of a parsed header, each checked: known dtype, non-negative integer shape, offsets
    inside the data section, shape x dtype size equal to the byte range, the tensors covering the data section
    exactly (no overlap, no gap, no trailing bytes: what the safetensors library itself requires)."""
    hint = "the file is corrupt or truncated: download or copy it again"
    if not isinstance(header, dict):
        raise InputError(f"safetensors header is not a JSON object ({path})", hint=hint)
    metadata = header.get("__metadata__")
    if metadata is not None and not (isinstance(metadata, dict)
                                     and all(isinstance(v, str) for v in metadata.values())):
        raise InputError(f"safetensors __metadata__ must map names to strings ({path})", hint=hint)
    entries: dict[str, dict[str, Any]] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        where = f"safetensors header entry {name[:80]!r}"
        if not (isinstance(entry, dict) and isinstance(entry.get("dtype"), str)
                and entry["dtype"] in SAFETENSORS_TYPES and isinstance(entry.get("shape"), list) and all(_is_int(d) and d >= 0 for d in entry["shape"])
                and isinstance(entry.get("data_offsets"), list) and len(entry["data_offsets"]) == 2
                and all(_is_int(o) for o in entry["data_offsets"])):
            raise InputError(f"{where} is malformed: needs a known dtype, a shape of non-negative integers and two "
                             f"integer data_offsets ({path})", hint=hint)
        begin, end = entry["data_offsets"]
        if not 0 <= begin <= end:
            raise InputError(f"{where} has invalid offsets [{begin}, {end}] ({path})", hint=hint)
        if end > data_bytes:
            raise InputError(f"safetensors file is truncated: {where} ends at byte {end} of a {data_bytes}-byte "
                             f"data section ({path})", hint=hint)
        expected = SAFETENSORS_TYPES[entry["dtype"]][1] * math.prod(entry["shape"])
        if expected != end - begin:
            raise InputError(f"{where}: shape {entry['shape']} of {entry['dtype']} needs {expected} bytes, its "
                             f"offsets hold {end - begin} ({path})", hint=hint)
        entries[name] = entry
    # Empty tensors too: one inside another tensor's bytes is an overlap, as the safetensors library says.
    spans = sorted((e["data_offsets"][0], e["data_offsets"][1], n) for n, e in entries.items())
    covered, last = 0, None  # like safetensors itself: the tensors tile the data section exactly, from byte 0
    for begin, end, name in spans:
        if begin < covered:
            raise InputError(f"safetensors header entries {last[:80]!r} and {name[:80]!r} overlap ({path})",
                             hint=hint)
        if begin > covered:
            raise InputError(f"safetensors data bytes {covered}-{begin} belong to no tensor (before "
                             f"{name[:80]!r}) ({path})", hint=hint)
        covered, last = end, name
    if covered != data_bytes:
        raise InputError(f"safetensors data section has {data_bytes - covered} bytes after the last tensor "
                         f"({path})", hint=hint)
    return entries


# ---- results files (bitcpm.results/1) -------------------------------------------------------------
def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _token_list(value: Any) -> bool:
    return isinstance(value, list) and all(_is_int(t) and 0 <= t <= MAX_TOKEN_ID for t in value)


def _check_result(item: Any, where: str, problems: list[str]) -> None:
    if not isinstance(item, dict):
        problems.append(f"{where}: must be an object with token_ids")
        return
    if not _token_list(item.get("token_ids")):
        problems.append(f"{where}.token_ids: must be a list of integer token ids in [0, {MAX_TOKEN_ID}]")
    if "id" in item and not (_is_int(item["id"]) or isinstance(item["id"], str)):
        problems.append(f"{where}.id: must be an integer or a string, got {type(item['id']).__name__}")
    if item.get("prompt") is not None and not isinstance(item["prompt"], str):
        problems.append(f"{where}.prompt: must be a string, got {type(item['prompt']).__name__}")
    if item.get("text") is not None and not isinstance(item["text"], str):
        problems.append(f"{where}.text: must be a string")
    if item.get("prompt_token_ids") is not None and not _token_list(item["prompt_token_ids"]):
        problems.append(f"{where}.prompt_token_ids: must be a list of integer token ids")
    for key in ("num_tokens",):
        if item.get(key) is not None and not (_is_int(item[key]) and item[key] >= 0):
            problems.append(f"{where}.{key}: must be a non-negative integer")
    for key in ("latency_s", "tokens_per_s"):
        if item.get(key) is not None and not _finite(item[key]):
            problems.append(f"{where}.{key}: must be a finite number")
    steps = item.get("top_logprobs")
    if steps is not None:
        good = isinstance(steps, list) and all(
            isinstance(step, list) and all(isinstance(pair, list) and len(pair) == 2 and _token_list(pair[:1])
                                           and _finite(pair[1]) for pair in step) for step in steps)
        if not good:
            problems.append(f"{where}.top_logprobs: must be a list (one per token) of [[token_id, logprob], ...]")


def _check_meta(data: dict[str, Any], path: Path, problems: list[str]) -> None:
    schema = data.get("schema")
    if schema != RESULTS_SCHEMA:
        problems.append(f"schema: {schema!r} is not {RESULTS_SCHEMA!r}" if schema is not None else
                        f"schema: missing (expected {RESULTS_SCHEMA!r})")
    for block in ("model", "runtime", "sampling", "summary"):
        if data.get(block) is not None and not isinstance(data[block], dict):
            problems.append(f"{block}: must be an object")
    sampling = data.get("sampling") if isinstance(data.get("sampling"), dict) else {}
    for key in ("temperature", "top_p"):
        if key in sampling and not _finite(sampling[key]):
            problems.append(f"sampling.{key}: must be a finite number")
    for key in ("seed", "max_new_tokens"):
        if key in sampling and sampling[key] is not None and not _is_int(sampling[key]):
            problems.append(f"sampling.{key}: must be an integer")
    if "chat_template" in sampling and not isinstance(sampling["chat_template"], bool):
        problems.append("sampling.chat_template: must be true or false")
    if data.get("notes") is not None and not (isinstance(data["notes"], list)
                                              and all(isinstance(n, str) for n in data["notes"])):
        problems.append("notes: must be a list of strings")


def read_results(path: str | Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(metadata, results) of a bitcpm results document or a bare list of results, every field checked."""
    path = Path(path)
    data = read_json_file(path, "results file")
    problems: list[str] = []
    if isinstance(data, dict) and "results" in data:
        _check_meta(data, path, problems)
        meta, items = {k: v for k, v in data.items() if k != "results"}, data["results"]
        if not isinstance(items, list):
            problems.append("results: must be a list")
            items = []
    elif isinstance(data, list):
        meta, items = {}, data
    else:
        raise InputError(f"{path} holds neither a results document nor a list of results",
                         hint=f'expected {{"schema": "{RESULTS_SCHEMA}", "results": [...]}} or [{{"token_ids": [...]}}]')
    for index, item in enumerate(items):
        _check_result(item, f"results[{index}]", problems)
    if not problems:
        counts = Counter(item.get("id", index) for index, item in enumerate(items))
        duplicates = sorted(str(i) for i, n in counts.items() if n > 1)
        if duplicates:
            problems.append(f"id: {', '.join(duplicates[:5])} appear more than once; every result needs its own id")
    if problems:
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        raise InputError(f"{path} is not a valid results file: {problems[0]}{more}",
                         hint=f"pass a file written by `bitcpm infer` ({RESULTS_SCHEMA}) or a list of objects with "
                              "token_ids", problems=problems[:20] if len(problems) > 1 else ())
    if not items:
        raise InputError(f"{path} holds no results", hint="run `bitcpm infer` with at least one prompt")
    return meta, items
