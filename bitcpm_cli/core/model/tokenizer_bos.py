"""BOS as training put it: a model `bitcpm train` wrote tokenizes a plain prompt with BOS first, as every training
document began, wherever the tokenizer is loaded.

`bitcpm train` packs BOS + document + EOS (core/training/data.py), but many tokenizers (the quickstart's, any whose
tokenizer.json post-processor adds no special token) add no BOS to a plain prompt. Stock transformers, bitcpm's engines
and a GGUF converted from the folder (its `tokenizer.ggml.add_bos_token` is probed from the tokenizer,
core/conversion/gguf/vocab.py) would then all run the model without the BOS it always saw.
`prepend_bos_like_training` rewrites a saved tokenizer so that it adds BOS:

- tokenizer.json's post-processor (what transformers 5 honours: with a tokenizer.json it drops tokenizer_config.json's
  `add_bos_token`), BOS put first in its TemplateProcessing (a post-processor of another kind, ByteLevel say, is kept,
  followed by a TemplateProcessing that adds BOS, as Llama 3's tokenizer.json does);
- tokenizer_config.json's `add_bos_token: true` (honoured by transformers 4's Llama-style tokenizers and by
  tokenizers without a tokenizer.json), `add_eos_token` set to what the tokenizer does, so that a tokenizer class that
  rebuilds its post-processor from the two flags keeps adding EOS exactly when it did.

Everything else the tokenizer does (EOS, pairs, offsets) is left as it was, and the result is checked by loading the
folder again. A model bitcpm did not train is never rewritten: it keeps its tokenizer's own behaviour.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

PROBE = "hello"


def adds_bos(tokenizer: Any) -> bool:
    """Whether the transformers tokenizer puts BOS first when it encodes a plain text (its default special tokens)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    ids = tokenizer(PROBE)["input_ids"]
    return bos is not None and bool(ids) and ids[0] == bos


def adds_eos(tokenizer: Any) -> bool:
    """Whether the transformers tokenizer puts EOS last when it encodes a plain text."""
    eos = getattr(tokenizer, "eos_token_id", None)
    ids = tokenizer(PROBE)["input_ids"]
    return eos is not None and bool(ids) and ids[-1] == eos


def _special(token: str, type_id: int) -> dict[str, Any]:
    return {"SpecialToken": {"id": token, "type_id": type_id}}


def _bos_template(bos: str, bos_id: int) -> dict[str, Any]:
    """A TemplateProcessing that puts BOS before the text (single) and before the pair (A then B)."""
    return {"type": "TemplateProcessing",
            "single": [_special(bos, 0), {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [_special(bos, 0), {"Sequence": {"id": "A", "type_id": 0}},
                     {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {bos: {"id": bos, "ids": [bos_id], "tokens": [bos]}}}


def _prepend_bos(template: dict[str, Any], bos: str, bos_id: int) -> dict[str, Any]:
    """A TemplateProcessing with BOS put first in its single and its pair template (one BOS at the start, as a
    training document has; gguf-py reads a BOS between A and B as an unknown separator)."""
    single = list(template.get("single") or [{"Sequence": {"id": "A", "type_id": 0}}])
    pair = list(template.get("pair") or [])
    special = dict(template.get("special_tokens") or {})
    special[bos] = {"id": bos, "ids": [bos_id], "tokens": [bos]}
    return {**template, "single": [_special(bos, 0)] + single, "pair": [_special(bos, 0)] + pair if pair else pair,
            "special_tokens": special}


def with_bos(processor: dict[str, Any] | None, bos: str, bos_id: int) -> dict[str, Any]:
    """The post-processor (tokenizer.json's `post_processor`) changed to put BOS first, everything else kept."""
    if processor is None:
        return _bos_template(bos, bos_id)
    kind = processor.get("type")
    if kind == "TemplateProcessing":
        return _prepend_bos(processor, bos, bos_id)
    if kind == "Sequence":
        inner = list(processor.get("processors") or [])
        at = next((i for i, p in enumerate(inner) if p.get("type") == "TemplateProcessing"), None)
        if at is None:
            inner.append(_bos_template(bos, bos_id))
        else:
            inner[at] = _prepend_bos(inner[at], bos, bos_id)
        return {**processor, "processors": inner}
    return {"type": "Sequence", "processors": [processor, _bos_template(bos, bos_id)]}


def _rewrite_tokenizer_json(path: Path, bos: str, bos_id: int) -> None:
    """tokenizer.json with a post-processor that adds BOS; the new file is checked with `tokenizers` first."""
    from tokenizers import Tokenizer

    data = json.loads(path.read_text(encoding="utf-8"))
    data["post_processor"] = with_bos(data.get("post_processor"), bos, bos_id)
    text = json.dumps(data, ensure_ascii=False, indent=2)
    checked = Tokenizer.from_str(text)
    plain = checked.encode(PROBE, add_special_tokens=False).ids
    ids = checked.encode(PROBE).ids
    if ids[:1] != [bos_id] or ids[1:1 + len(plain)] != plain:
        raise ValueError(f"the rewritten post-processor gives {ids}, not BOS then {plain}")
    path.write_text(text, encoding="utf-8")


def _rewrite_tokenizer_config(path: Path, adds_eos_now: bool) -> None:
    config = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    config["add_bos_token"] = True
    config["add_eos_token"] = adds_eos_now
    path.write_text(json.dumps(config, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


def prepend_bos_like_training(folder: Path, tokenizer: Any) -> list[str]:
    """Make the tokenizer saved in `folder` (from `tokenizer`, the one training used) add BOS to a plain text, as
    training put BOS before every document; returns notes. Nothing changes when it has no BOS token or adds BOS
    already. When the saved tokenizer cannot be made to add BOS, a note says so (the model itself is fine)."""
    bos, bos_id = getattr(tokenizer, "bos_token", None), getattr(tokenizer, "bos_token_id", None)
    if bos is None or bos_id is None or adds_bos(tokenizer):
        return []
    eos_now = adds_eos(tokenizer)
    tokenizer_json = folder / "tokenizer.json"
    try:
        if tokenizer_json.is_file():
            _rewrite_tokenizer_json(tokenizer_json, str(bos), int(bos_id))
        _rewrite_tokenizer_config(folder / "tokenizer_config.json", eos_now)
        reloaded = type(tokenizer).from_pretrained(folder)
        if not adds_bos(reloaded):
            raise ValueError(f"{type(tokenizer).__name__} still encodes {PROBE!r} as {reloaded(PROBE)['input_ids']}")
    except (ValueError, OSError, KeyError, TypeError) as exc:
        return [(f"final/'s tokenizer could not be made to add BOS ({bos}) to a plain prompt ({exc}): training put "
                 "BOS before every document, so prepend it yourself when you run the model (llama.cpp: the GGUF's "
                 "tokenizer.ggml.add_bos_token)")]
    return [(f"final/'s tokenizer now adds BOS ({bos}, id {bos_id}) to a plain prompt, as training put it before "
             "every document (tokenizer.json post-processor, tokenizer_config.json add_bos_token): transformers, "
             "bitcpm's engines and a GGUF converted from it run the model as it was trained")]
