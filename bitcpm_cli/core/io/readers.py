"""One careful reader per input kind: every file bitcpm reads goes through here (or, for safetensors headers,
`io.safetensors`; for results files, `formats.results`).

- JSON (`read_json_file`, `parse_json`): size limit, nesting depth limit, integers of at most MAX_INT_DIGITS digits,
  no NaN / Infinity, errors as `file, line L column C` or the field.
- Text (`read_text_file`, `iter_text_lines`): UTF-8 only, a bad byte is reported as `file:line`.
- YAML (`read_yaml_file`, `parse_yaml`): safe loader, aliases allowed only while the document they expand to stays
  under MAX_YAML_NODES nodes (an alias bomb is refused before it is built).
- Structured files (`read_structured_file`): JSON or YAML by extension.

Every problem is a BitcpmError (exit 2) that names the file and the line or field.
"""

from __future__ import annotations

import json
import math
import os
import stat
from pathlib import Path
from typing import Any, Iterator

from bitcpm_cli.core.errors import BitcpmError, ConfigError, InputError

MAX_JSON_BYTES = 2 * 2**30
MAX_JSON_DEPTH = 64
MAX_INT_DIGITS = 40  # a 128-bit integer has 39 digits
MAX_YAML_NODES = 100_000


UTF8_HINT = "save the file as UTF-8"


class _Limit(Exception):
    """Raised from inside the JSON decoder's hooks; turned into an InputError with the location."""


SPECIAL_KINDS = ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a FIFO"),
                 (stat.S_ISSOCK, "a socket"))


def special_kind(path: str | os.PathLike[str]) -> str | None:
    """'a FIFO', 'a character device', ... for a path that is (or links to) neither a regular file nor a folder;
    None for a regular file, a folder, or nothing there. Never opens the path (opening a FIFO blocks)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    return next((name for test, name in SPECIAL_KINDS if test(mode)), None)


def file_problem(path: str | os.PathLike[str], what: str) -> str | None:
    """Why `path` cannot be read as the file `what` names (not found, a folder, a FIFO or device...), or None for a
    regular file (or a link to one). Never opens the path: opening a FIFO would block."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return f"{what} not found ({path})"
    except OSError as exc:
        return f"{what} cannot be read ({path}): {exc.strerror or exc}"
    if stat.S_ISDIR(mode):
        return f"{what} is a folder, not a file ({path})"
    special = special_kind(path)
    if special:
        return f"{what} is {special}, not a regular file ({path})"
    return None


def is_int(value: Any) -> bool:
    """An integer that is not a bool (JSON true / false parse to bools, which are ints in Python)."""
    return isinstance(value, int) and not isinstance(value, bool)


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
    """A regular file's bytes (a FIFO or device is refused unopened: it would block or never end), at most
    `max_bytes` of them, read with that bound (a size that changes while reading cannot exceed it)."""
    path = Path(path)
    if path.exists() and not path.is_dir() and (problem := file_problem(path, what)):
        raise InputError(problem, hint="pass a regular file")
    try:
        size = path.stat().st_size
        if max_bytes is not None and size > max_bytes:
            raise InputError(f"{what} is too large: {size:,} bytes, at most {max_bytes:,} ({path})",
                             hint="check that this is the right file")
        with path.open("rb") as handle:
            raw = handle.read() if max_bytes is None else handle.read(max_bytes + 1)
        if max_bytes is not None and len(raw) > max_bytes:
            raise InputError(f"{what} grew beyond {max_bytes:,} bytes while it was read ({path})",
                             hint="check that this is the right file")
        return raw
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
    if path.exists() and not path.is_dir() and (problem := file_problem(path, what)):
        raise InputError(problem, hint="pass a regular file")
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
