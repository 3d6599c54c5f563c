"""The tokenizer of a GGUF file: SentencePiece-style BPE as llama.cpp's "llama" tokenizer (with merge-rank scores),
byte-level BPE as its "gpt2" tokenizer (with its pre-tokenizer detected as `convert_hf_to_gguf.py` detects it), added
tokens typed as transformers matches them, and BOS / EOS added exactly when transformers adds them.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

from bitcpm_cli.core.conversion.gguf.tokenizer_files import HINT, read_tokenizer_files
from bitcpm_cli.core.errors import InputError


def write_tokenizer(writer: Any, source: Path, vocab_size: int, notes: list[str]) -> None:
    """SentencePiece-style (BPE with byte fallback: Llama, BitCPM) as llama.cpp's "llama" tokenizer, byte-level
    BPE (GPT-2 style) as its "gpt2" tokenizer with the merges."""
    import gguf
    from gguf.vocab import SpecialVocab

    parsed = read_tokenizer_files(source, vocab_size)  # every broken file refused here, all at once
    vocab, model, pre, merges, hf = _load_vocab(source, parsed)
    tokens, scores, types = [], [], []
    for text, score, kind in vocab.all_tokens():
        tokens.append(text)
        scores.append(score)
        types.append(kind)
    if len(tokens) > vocab_size:
        raise InputError(f"the tokenizer has {len(tokens)} tokens but the embeddings only {vocab_size} rows",
                         hint="resize the model's embeddings to the tokenizer")
    padded = vocab_size - len(tokens)
    for index in range(len(tokens), vocab_size):  # embedding rows no token uses
        tokens.append(f"[PAD{index}]".encode())
        scores.append(-1000.0)
        types.append(gguf.TokenType.UNUSED)
    if padded:
        notes.append(f"{padded} unused embedding rows written as [PAD] tokens")
    _added_token_types(hf, tokens, types)
    if model == "llama":
        scores = _merge_scores(parsed, scores)
    else:
        pre = detect_pretokenizer(source, hf, parsed)
    writer.add_tokenizer_model(model)
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    if model == "llama":
        writer.add_token_scores(scores)
    writer.add_token_types(types)
    special = SpecialVocab(source, load_merges=merges, n_vocab=len(tokens))
    # llama.cpp adds BOS / EOS to a prompt exactly when transformers' tokenizer does
    probe = hf("0")["input_ids"]
    special.add_special_token["bos"] = bool(probe) and probe[0] == hf.bos_token_id
    special.add_special_token["eos"] = bool(probe) and probe[-1] == hf.eos_token_id
    special.add_to_gguf(writer)


def _route(tokenizer: dict[str, Any]) -> str | None:
    """gguf-py's reader for a checked tokenizer.json, decided as gguf-py decides it: "llama" (BPE with byte
    fallback and a Sequence decoder), "gpt2" (byte-level BPE: no byte fallback, a ByteLevel decoder), else None."""
    model, decoder = tokenizer["model"], tokenizer["decoder"]["type"]
    if model.get("byte_fallback", False):
        return "llama" if decoder == "Sequence" else None
    return "gpt2" if decoder == "ByteLevel" else None


def _load_vocab(source: Path, tokenizer: dict[str, Any]) -> tuple[Any, str, str, bool, Any]:
    """gguf-py's vocabulary of the folder, its llama.cpp tokenizer model, pre-tokenizer, whether merges are written,
    and transformers' tokenizer; what transformers or tokenizers still reject is an InputError naming the folder."""
    from gguf.vocab import BpeVocab, LlamaHfVocab
    from transformers import AutoTokenizer

    route = _route(tokenizer)
    if route is None:
        raise InputError(f"cannot export the tokenizer of {source} (tokenizer.json is a BPE with decoder "
                         f"{tokenizer['decoder']['type']!r} and byte_fallback "
                         f"{str(bool(tokenizer['model'].get('byte_fallback', False))).lower()})",
                         hint="GGUF export supports tokenizer.json with a SentencePiece-style BPE (byte "
                              "fallback, like Llama and BitCPM) or a byte-level BPE (GPT-2 style)")
    try:  # the library's own reading of what the checks let through: its exception is the file's problem
        if route == "llama":  # llama.cpp's SPM pre-tokenizer: "default"; LlamaHfVocab loads with transformers
            vocab = LlamaHfVocab(source)
            return vocab, "llama", "default", False, vocab.tokenizer
        return BpeVocab(source), "gpt2", "", True, AutoTokenizer.from_pretrained(source, trust_remote_code=False)
    except Exception as exc:  # noqa: BLE001 - tokenizers raises a bare Exception for a file it rejects
        raise InputError(f"transformers cannot load the tokenizer of {source} ({type(exc).__name__}: "
                         f"{str(exc)[:200]})", hint=HINT) from None


def _added_token_types(tokenizer: Any, tokens: list[bytes], types: list[Any]) -> None:
    """Each added token as transformers matches it: under its own text, CONTROL when special (llama.cpp matches it
    in a prompt parsed with specials, as transformers does), else USER_DEFINED (matched in any text, as transformers
    does). gguf-py's readers leave an added token that is also in the BPE vocabulary NORMAL (StarCoder's
    `<repo_name>`, Falcon's `>>TITLE<<`, Phi-3's `<|assistant|>`: llama.cpp then splits it into pieces) and make
    every other one of a byte-level BPE CONTROL (DeepSeek's non-special added tokens: llama.cpp then never matches
    them in plain text)."""
    import gguf

    special_ids = set(tokenizer.all_special_ids)
    for index, added in tokenizer.added_tokens_decoder.items():
        if index < len(tokens) and types[index] not in (gguf.TokenType.BYTE, gguf.TokenType.UNUSED):
            tokens[index] = added.content.encode()
            types[index] = (gguf.TokenType.CONTROL if added.special or index in special_ids else
                            gguf.TokenType.USER_DEFINED)


def detect_pretokenizer(source: Path, tokenizer: Any, parsed: dict[str, Any]) -> str:
    """llama.cpp's name for a byte-level BPE tokenizer's pre-tokenizer, found as `convert_hf_to_gguf.py` finds it
    (sha256 of the ids of a probe text); a tokenizer that is not in its table but whose pre-tokenizer is GPT-2's
    (ByteLevel with its regex) is `gpt-2`; anything else is refused (llama.cpp would split text differently), and so
    is a tokenizer whose BPE `ignore_merges` is not the one llama.cpp uses under that name (a word that is one token
    whole but that the merges build otherwise, like Llama 3's `Việt`, would then come out differently)."""
    from bitcpm_cli.core.conversion.gguf.pretokenizers import IGNORE_MERGES, PRETOKENIZERS, PROBE

    digest = hashlib.sha256(str(tokenizer.encode(PROBE)).encode()).hexdigest()
    name = PRETOKENIZERS.get(digest)
    if name is None:
        pre = parsed.get("pre_tokenizer") if isinstance(parsed.get("pre_tokenizer"), dict) else {}
        if not (pre.get("type") == "ByteLevel" and pre.get("use_regex", True)):
            raise InputError(f"llama.cpp does not know this tokenizer's pre-tokenizer ({pre.get('type')}, probe hash "
                             f"{digest[:12]}...): it would split text differently from transformers",
                             hint="GGUF export supports the pre-tokenizers llama.cpp's convert_hf_to_gguf.py knows")
        name = "gpt-2"
    ignore = bool(getattr(tokenizer.backend_tokenizer.model, "ignore_merges", False))
    if ignore != (name in IGNORE_MERGES):
        raise InputError(f"this tokenizer's pre-tokenizer is llama.cpp's {name!r}, which "
                         f"{'ignores' if name in IGNORE_MERGES else 'applies'} the BPE merges to a word that is one "
                         f"token whole, but tokenizer.json says \"ignore_merges\": {str(ignore).lower()}: llama.cpp "
                         "would tokenize some words differently from transformers",
                         hint="export a tokenizer whose ignore_merges matches the pre-tokenizer llama.cpp detects")
    return name


def _merge_scores(parsed: dict[str, Any], scores: list[float]) -> list[float]:
    """SentencePiece-style scores for llama.cpp's "llama" tokenizer, which merges the adjacent pair whose result has
    the highest score: from a BPE tokenizer.json, minus the rank of the merge that makes each token (single
    characters 0, tokens that no merge makes below every merge), so llama.cpp merges in the BPE's order. (gguf-py's
    LlamaHfVocab gives every token -1000, and llama.cpp then merges in the wrong order.)"""
    model = parsed["model"]
    merges = model.get("merges") or []
    rank: dict[str, int] = {}
    for index, merge in enumerate(merges):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        rank.setdefault(left + right, index)
    out = list(scores)
    for text, token_id in model.get("vocab", {}).items():
        if token_id < len(out):
            out[token_id] = (-float(rank[text]) if text in rank else 0.0 if len(text) == 1 or
                             re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", text) else -float(len(merges) + 1))
    return out
