"""Which tokens `bitcpm eval` feeds a model and which it scores: the two schemes, and the per-token file.

- `windows` (the default): the corpus as documents (BOS when the tokenizer adds it + document + EOS, concatenated),
  sliding windows of `context` tokens whose ends advance by `stride`; every token after the first is scored once.
- `llama.cpp`: `llama-perplexity`'s default (tools/perplexity/perplexity.cpp, `perplexity()`), exactly: the file read
  whole with one trailing newline dropped (`-f`), tokenized as ONE string with BOS first when the model's tokenizer adds
  BOS (`common_tokenize(ctx, prompt, true)`, add_bos = llama_vocab_get_add_bos); refused below 2 x n_ctx tokens;
  n_ctx-token chunks, n_chunk = n_tokens // n_ctx; each chunk fed alone with its first token replaced by BOS when the
  model adds BOS; scored: the chunk's tokens first + 1 .. n_ctx - 1 (first = n_ctx / 2), each predicted from the
  logits of the position before it, so n_ctx - 1 - first tokens a chunk. Its final estimate is
  `PPL = exp(mean NLL) +/- PPL * sqrt((mean(NLL^2) - mean NLL^2) / (count - 1))`, printed with 4 and 5 decimals.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from bitcpm_cli.core.errors import InputError

SCORING = ("windows", "llama.cpp")
PER_TOKEN_SCHEMA = "bitcpm.eval.tokens/1"


@dataclass
class Segment:
    """One forward pass: `inputs` go in; logits rows row0 .. row1 - 1 predict `targets` (row0 + k predicts
    targets[k]); targets[0] is token `position` of the corpus; `chunk` numbers the passes from 0."""

    inputs: np.ndarray
    row0: int
    row1: int
    targets: np.ndarray
    position: int
    chunk: int


def windows(n_tokens: int, context: int, stride: int) -> Iterator[tuple[int, int, int]]:
    """(begin, end, first) of each window: tokens [begin, end) go in, tokens first .. end - 1 are scored. Window
    ends advance by `stride`, so every token after the first is scored exactly once, with at least
    context - stride tokens before it (except in the first window)."""
    if not 1 <= stride < context:
        raise ValueError("need 1 <= stride < context")
    scored_to, end = 1, min(context, n_tokens)
    while scored_to < n_tokens:
        yield max(0, end - context), end, scored_to
        scored_to, end = end, min(end + stride, n_tokens)


def window_segments(ids: np.ndarray, context: int, stride: int) -> Iterator[Segment]:
    for chunk, (begin, end, first) in enumerate(windows(len(ids), context, stride)):
        yield Segment(ids[begin:end], first - 1 - begin, end - 1 - begin, ids[first:end], first, chunk)


def llamacpp_first(context: int) -> int:
    """The first position of a chunk whose logits llama-perplexity uses (n_ctx / 2)."""
    return context // 2


def llamacpp_segments(ids: np.ndarray, context: int, bos: int | None) -> Iterator[Segment]:
    """llama-perplexity's chunks: BOS (when given) replaces each chunk's first token; the second half is scored."""
    first = llamacpp_first(context)
    for chunk in range(len(ids) // context):
        start = chunk * context
        inputs = np.array(ids[start:start + context], dtype=np.int32)  # a copy: the corpus keeps its token
        if bos is not None:
            inputs[0] = bos
        yield Segment(inputs, first, context - 1, ids[start + first + 1:start + context], start + first + 1, chunk)


def scored_positions(n_tokens: int, scoring: str, context: int) -> int:
    """How many tokens a scheme scores in a corpus of n_tokens."""
    if scoring == "llama.cpp":
        return (n_tokens // context) * (context - 1 - llamacpp_first(context))
    return n_tokens - 1


def read_as_llamacpp(path: Path, encode, bos: int | None, max_tokens: int | None, context: int) -> np.ndarray:
    """`llama-perplexity -f path`'s tokens: the whole file less one trailing newline, one string, BOS first when `bos`
    is given (the model adds BOS); cut to `max_tokens`; refused below 2 x context tokens, as llama-perplexity does."""
    from bitcpm_cli.core.io.readers import decode_utf8, read_bytes

    raw = read_bytes(path, "--data file")
    raw = raw[:-1] if raw.endswith(b"\n") else raw
    try:
        text = raw.decode("utf-8")  # a leading U+FEFF stays: llama.cpp tokenizes it too
    except UnicodeDecodeError:
        decode_utf8(raw, str(path), "--data file")  # raises, naming the line and byte
        raise
    ids = ([bos] if bos is not None else []) + list(encode(text))
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if len(ids) < 2 * context:
        raise InputError(f"--scoring llama.cpp needs at least {2 * context} tokens with --context {context}, as "
                         f"llama-perplexity does; {path} gives {len(ids)}",
                         hint="use a longer text, a smaller --context, or --scoring windows")
    return np.asarray(ids, dtype=np.int32)


def llamacpp_estimate(sum_nll: float, sum_nll2: float, count: int) -> dict[str, Any]:
    """llama-perplexity's final estimate from the sums over the scored tokens: PPL, its uncertainty (None where
    llama.cpp reports "Unexpected negative standard deviation") and the line as it prints it."""
    mean = sum_nll / count
    var = sum_nll2 / count - mean * mean
    ppl = math.exp(mean)
    if var > 0 and count > 1:
        unc = ppl * math.sqrt(var / (count - 1))
        line = f"Final estimate: PPL = {ppl:.4f} +/- {unc:.5f}"
    else:
        unc, line = None, "Unexpected negative standard deviation of log(prob)"
    return {"ppl": ppl, "ppl_unc": unc, "final_estimate": line}


def _finite(value: float, digits: int | None = None) -> float | None:
    if not math.isfinite(value):
        return None
    return round(value, digits) if digits is not None else value


def per_token_lines(header: dict[str, Any], positions: np.ndarray, chunks: np.ndarray, targets: np.ndarray,
                    nll: list[np.ndarray], kld: list[np.ndarray | None],
                    same_top: list[np.ndarray | None]) -> Iterable[str]:
    """The per-token file (schema bitcpm.eval.tokens/1, docs/reference.md): a header line, then one line a scored
    token with a value for each model in the header's order (null where it does not apply or is not finite)."""
    yield json.dumps(header, ensure_ascii=False, allow_nan=False)
    compared = any(k is not None for k in kld)
    for i in range(len(positions)):
        line: dict[str, Any] = {"i": i, "chunk": int(chunks[i]), "position": int(positions[i]),
                                "token": int(targets[i]), "nll": [_finite(float(n[i])) for n in nll]}
        if compared:
            line["kld"] = [None if k is None else _finite(float(k[i])) for k in kld]
            line["same_top"] = [None if s is None else bool(s[i]) for s in same_top]
        yield json.dumps(line, allow_nan=False)


def write_per_token(output: Path, inputs: list[Any], overwrite: bool, lines: Iterable[str]) -> None:
    """The per-token file through the output guard (claimed, staged, renamed into place)."""
    from bitcpm_cli.core.io.outputs import OutputGuard

    with OutputGuard(output, inputs, overwrite=overwrite, kind="file", what="--per-token") as staging, \
            open(staging, "w", encoding="utf-8") as handle:
        handle.writelines(line + "\n" for line in lines)
        handle.flush()
        os.fsync(handle.fileno())
