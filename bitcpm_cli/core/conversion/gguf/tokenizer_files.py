"""The tokenizer files of a model folder, checked before a GGUF export writes anything: every problem that
transformers, tokenizers or gguf-py would otherwise meet as a traceback (or, worse, as a silently different token
list) is one line naming the file and the key, all reported at once as one InputError.

What holds once `read_tokenizer_files` returns: tokenizer.json is a JSON object whose BPE `model` has a
`vocab` object of token -> id with ids exactly 0..N-1 (llama.cpp numbers tokens by position), `merges` a list of
"a b" strings or [a, b] pairs (one format) naming tokens of the vocabulary, `added_tokens` a list of complete
objects whose new ids follow the vocabulary without gaps, and a `decoder` object; the whole token list fits the
embedding rows; tokenizer_config.json / special_tokens_map.json (when present) are objects whose special tokens are
tokens of tokenizer.json; chat templates are UTF-8 text; a tokenizer.model is a SentencePiece model; config.json's
special token ids are non-negative integers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bitcpm_cli.core.errors import BitcpmError, InputError, collect
from bitcpm_cli.core.io.readers import is_int, read_bytes, read_json_file, read_text_file

HINT = ("restore the tokenizer files from the model's source, or save the tokenizer again with transformers "
        "(AutoTokenizer.from_pretrained(...).save_pretrained(...)); nothing was written")
SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")
ADDED_FIELDS = {"id": "an integer", "content": "a string", "single_word": "a bool", "lstrip": "a bool",
                "rstrip": "a bool", "normalized": "a bool", "special": "a bool"}
LISTED = 20  # problems listed one a line; the rest are counted


def read_tokenizer_files(source: Path, rows: int) -> dict[str, Any]:
    """tokenizer.json (parsed), once every tokenizer file of `source` is what GGUF export can write for a model with
    `rows` embedding rows; InputError listing every problem otherwise."""
    problems: list[str] = []
    tokenizer = _load(source / "tokenizer.json", "tokenizer.json", problems)
    tokens: set[str] | None = None  # the token texts special tokens must name, once tokenizer.json is sound
    if tokenizer is None and not problems:
        other = " (it has only tokenizer.model)" if (source / "tokenizer.model").exists() else ""
        problems.append(f"tokenizer.json not found in {source}{other}: GGUF export reads the tokenizer from it")
    elif tokenizer is not None:
        problems += tokenizer_json_problems(tokenizer, rows)
        tokens = None if problems else _token_texts(tokenizer)
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        data = _load(source / name, name, problems)
        if data is not None:
            problems += special_file_problems(data, name, tokens)
    problems += _template_problems(source) + _sentencepiece_problems(source) + _config_id_problems(source)
    if len(problems) > LISTED:
        problems = problems[:LISTED] + [f"... and {len(problems) - LISTED} more"]
    collect(problems, InputError, f"the tokenizer files of {source} cannot be exported", HINT)
    return tokenizer


def _load(path: Path, name: str, problems: list[str]) -> Any:
    """The parsed JSON file, or None when it is absent (or broken: its problem is added)."""
    if not path.exists() and not path.is_symlink():
        return None
    try:
        return read_json_file(path, name)
    except BitcpmError as exc:
        problems.append(exc.message)
        return None


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a bool", type(None): "null"}.get(
        type(value), "a number")


def _token_texts(tokenizer: dict[str, Any]) -> set[str]:
    """The texts of every token of a checked tokenizer.json: its vocabulary and its added tokens."""
    return set(tokenizer["model"]["vocab"]) | {token["content"] for token in tokenizer.get("added_tokens") or ()}


# ---- tokenizer.json -------------------------------------------------------------------------------------------------
def tokenizer_json_problems(tokenizer: Any, rows: int) -> list[str]:
    """Every problem of a parsed tokenizer.json for a model with `rows` embedding rows."""
    if not isinstance(tokenizer, dict):
        return [f"tokenizer.json must hold a JSON object, not {_kind(tokenizer)}"]
    model = tokenizer.get("model")
    if not isinstance(model, dict):
        return [f"tokenizer.json \"model\" must be an object, not {_kind(model)}"]
    if model.get("type") != "BPE":
        return [(f"tokenizer.json model.type is {model.get('type')!r}: GGUF export supports BPE tokenizers "
                 "(SentencePiece-style with byte fallback, or byte-level)")]
    problems = []
    if not isinstance(tokenizer.get("decoder"), dict) or not isinstance(tokenizer["decoder"].get("type"), str):
        problems.append(f"tokenizer.json \"decoder\" must be an object with a type, not {_kind(tokenizer.get('decoder'))}")
    vocab = model.get("vocab")
    if not isinstance(vocab, dict):
        return problems + [f"tokenizer.json model.vocab must be an object of token -> id, not {_kind(vocab)}"]
    problems += _vocab_problems(vocab)
    problems += _merge_problems(model.get("merges"), vocab)
    added, added_problems = _added_token_problems(tokenizer.get("added_tokens"), vocab)
    problems += added_problems
    if not problems and len(vocab) + added > rows:
        problems.append(f"tokenizer.json has {len(vocab) + added} tokens but the model's embeddings only {rows} rows")
    return problems


def _vocab_problems(vocab: dict[str, Any]) -> list[str]:
    """The ids of model.vocab: non-negative integers, exactly 0..N-1."""
    bad = [(text, value) for text, value in vocab.items() if not is_int(value) or value < 0]
    if bad:
        return [(f"tokenizer.json model.vocab: {len(bad)} token(s) have an id that is not a non-negative integer "
                 f"(first: {bad[0][0]!r}: {bad[0][1]!r})")]
    problems, owner = [], {}
    for text, value in vocab.items():
        if value in owner:
            problems.append(f"tokenizer.json model.vocab: id {value} is given to both {owner[value]!r} and {text!r}")
        owner.setdefault(value, text)
    beyond = sorted(value for value in owner if value >= len(vocab))
    if beyond:
        problems.append(f"tokenizer.json model.vocab: ids must be 0..{len(vocab) - 1} (llama.cpp numbers tokens by "
                        f"position), but {owner[beyond[0]]!r} has {beyond[0]}"
                        + (f" ({len(beyond)} ids beyond)" if len(beyond) > 1 else ""))
    return problems


def _merge_problems(merges: Any, vocab: dict[str, Any]) -> list[str]:
    """model.merges: a list of "a b" strings or of [a, b] pairs (not both), each naming tokens of the vocabulary."""
    if not isinstance(merges, list):
        return [f"tokenizer.json model.merges must be a list, not {_kind(merges)}"]
    malformed, unknown, kinds = [], [], set()
    for index, merge in enumerate(merges):
        if isinstance(merge, str):
            kinds.add("string")
            pair = merge.split(" ")
        elif isinstance(merge, list):
            kinds.add("pair")
            pair = merge
        else:
            pair = None
        if pair is None or len(pair) != 2 or not all(isinstance(part, str) and part for part in pair):
            malformed.append(index)
        elif not all(text in vocab for text in (pair[0], pair[1], pair[0] + pair[1])):
            unknown.append(index)
    problems = []
    if malformed:
        problems.append(f"tokenizer.json model.merges: {len(malformed)} merge(s) are not \"a b\" strings or [a, b] "
                        f"pairs of tokens (first: #{malformed[0]}: {str(merges[malformed[0]])[:60]!r})")
    if len(kinds) > 1:
        problems.append("tokenizer.json model.merges mixes \"a b\" strings and [a, b] pairs (use one format)")
    if unknown:
        problems.append(f"tokenizer.json model.merges: {len(unknown)} merge(s) name tokens that are not in "
                        f"model.vocab (first: #{unknown[0]}: {str(merges[unknown[0]])[:60]!r})")
    return problems


def _added_token_problems(added: Any, vocab: dict[str, Any]) -> tuple[int, list[str]]:
    """added_tokens: complete objects with distinct ids; those not in model.vocab take the ids after it, in order.
    Returns how many tokens they add and the problems."""
    if added is None:
        return 0, []
    if not isinstance(added, list):
        return 0, [f"tokenizer.json added_tokens must be a list, not {_kind(added)}"]
    problems, seen = [], {}
    for index, token in enumerate(added):
        where = f"tokenizer.json added_tokens[{index}]"
        if not isinstance(token, dict):
            problems.append(f"{where} must be an object, not {_kind(token)}")
            continue
        wrong = [f"{key} ({'missing' if key not in token else _kind(token[key])}, must be {kind})"
                 for key, kind in ADDED_FIELDS.items() if not _field_ok(key, token.get(key))]
        if wrong:
            problems.append(f"{where}: " + ", ".join(wrong))
        elif token["id"] in seen and seen[token["id"]] != token["content"]:
            problems.append(f"{where}: id {token['id']} is also {seen[token['id']]!r}'s")
        else:
            seen[token["id"]] = token["content"]
    new = sorted(i for i in seen if i >= len(vocab))
    if not problems and new != list(range(len(vocab), len(vocab) + len(new))):
        gap = next(i for n, i in enumerate(new) if i != len(vocab) + n)
        problems.append(f"tokenizer.json added_tokens: the ids after model.vocab must be {len(vocab)}, "
                        f"{len(vocab) + 1}, ... without gaps (llama.cpp numbers tokens by position), but "
                        f"{seen[gap]!r} has {gap}")
    return len(new), problems


def _field_ok(key: str, value: Any) -> bool:
    if key == "id":
        return is_int(value) and value >= 0
    if key == "content":
        return isinstance(value, str) and value != ""
    return isinstance(value, bool)


# ---- tokenizer_config.json, special_tokens_map.json ------------------------------------------------------------------
def special_file_problems(data: Any, name: str, tokens: set[str] | None) -> list[str]:
    """A tokenizer_config.json / special_tokens_map.json: an object whose special tokens are strings (or
    {"content": ...} objects) naming tokens of tokenizer.json (`tokens`; None: not checked), add_*_token bools,
    a chat_template string or list and added_tokens_decoder entries transformers can build."""
    if not isinstance(data, dict):
        return [f"{name} must hold a JSON object, not {_kind(data)}"]
    problems = []
    for key in SPECIAL_KEYS:
        if data.get(key) is not None:
            problems += _special_token_problems(data[key], f"{name} {key}", tokens)
    for key in ("add_bos_token", "add_eos_token"):
        if data.get(key) is not None and not isinstance(data[key], bool):
            problems.append(f"{name} {key} must be true or false, not {_kind(data[key])}")
    for key in ("additional_special_tokens", "extra_special_tokens"):
        value = data.get(key)
        items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else None
        if value is not None and items is None:
            problems.append(f"{name} {key} must be a list of tokens, not {_kind(value)}")
        for item in items or ():
            problems += _special_token_problems(item, f"{name} {key}", tokens)
    problems += _decoder_problems(data.get("added_tokens_decoder"), name)
    problems += _chat_template_problems(data.get("chat_template"), f"{name} chat_template")
    return problems


def _special_token_problems(value: Any, where: str, tokens: set[str] | None) -> list[str]:
    text = value.get("content") if isinstance(value, dict) else value
    if not isinstance(text, str) or not text:
        return [f"{where} must be a token (a string, or an object with its \"content\"), not {_kind(value)}"]
    if tokens is not None and text not in tokens:
        return [f"{where} {text!r} is not a token of tokenizer.json (transformers would add it with a new id)"]
    return []


def _decoder_problems(decoder: Any, name: str) -> list[str]:
    if decoder is None:
        return []
    if not isinstance(decoder, dict):
        return [f"{name} added_tokens_decoder must be an object of id -> token, not {_kind(decoder)}"]
    problems = []
    for key, token in decoder.items():
        where = f"{name} added_tokens_decoder[{key!r}]"
        if not key.isdigit():
            problems.append(f"{where}: the key must be a token id")
        elif not isinstance(token, dict) or not isinstance(token.get("content"), str):
            problems.append(f"{where} must be an object with a \"content\" string, not {_kind(token)}")
        else:
            unknown = sorted(set(token) - set(ADDED_FIELDS) - {"__type"})
            wrong = [k for k in ADDED_FIELDS if k not in ("id", "content") and k in token
                     and not isinstance(token[k], bool)]
            if unknown or wrong:
                problems.append(f"{where}: " + ", ".join([f"unknown key {k!r}" for k in unknown]
                                                       + [f"{k} must be a bool" for k in wrong]))
    return problems


def _chat_template_problems(template: Any, where: str) -> list[str]:
    if template is None or isinstance(template, str):
        return []
    if isinstance(template, list) and all(isinstance(t, dict) and isinstance(t.get("name"), str)
                                          and isinstance(t.get("template"), str) for t in template):
        return []
    return [f"{where} must be a string or a list of {{\"name\", \"template\"}} objects, not {_kind(template)}"]


# ---- the other files gguf-py and transformers read --------------------------------------------------------------------
def _template_problems(source: Path) -> list[str]:
    """chat_template.jinja (and additional_chat_templates/*.jinja) UTF-8 text, chat_template.json an object."""
    problems = []
    jinja = [source / "chat_template.jinja"] + sorted((source / "additional_chat_templates").glob("*.jinja"))
    for path in jinja:
        if path.exists():
            try:
                read_text_file(path, path.name)
            except BitcpmError as exc:
                problems.append(exc.message)
    data = _load(source / "chat_template.json", "chat_template.json", problems)
    if data is not None:
        if not isinstance(data, dict):
            problems.append(f"chat_template.json must hold a JSON object, not {_kind(data)}")
        else:
            problems += _chat_template_problems(data.get("chat_template"), "chat_template.json chat_template")
    return problems


def _sentencepiece_problems(source: Path) -> list[str]:
    """A tokenizer.model must be a SentencePiece model with pieces (read as protobuf data, nothing runs)."""
    path = source / "tokenizer.model"
    if not path.exists():
        return []
    from google.protobuf.message import DecodeError
    from transformers.convert_slow_tokenizer import import_protobuf

    try:
        raw = read_bytes(path, "tokenizer.model")
    except BitcpmError as exc:
        return [exc.message]
    model = import_protobuf().ModelProto()
    try:
        model.ParseFromString(raw)
    except DecodeError as exc:
        return [f"tokenizer.model is not a SentencePiece model ({path}: {exc})"]
    if not model.pieces:
        return [f"tokenizer.model is not a SentencePiece model ({path}: it holds no pieces)"]
    return []


def _config_id_problems(source: Path) -> list[str]:
    """config.json's *_token_id: a non-negative integer, a list or null (gguf-py refuses a negative one)."""
    path = source / "config.json"
    try:
        config = read_json_file(path, "config.json")
    except BitcpmError as exc:
        return [exc.message]
    problems = []
    for key in sorted(k for k in config if k.endswith("_token_id")) if isinstance(config, dict) else ():
        value = config[key]
        if value is not None and not isinstance(value, list) and not (is_int(value) and value >= 0):
            problems.append(f"config.json {key} must be a non-negative integer, not {value!r}")
    return problems
