"""Token-by-token comparison of two results files, with divergences explained.

Greedy decoding on two devices can part ways for two reasons: a near-tie flip (the top-2 logprobs of a step are
almost equal and tiny numerical differences pick the other token: harmless) or a real divergence (the chosen token
led by a clear margin on one side: a numerical or weight bug). With `--logprobs` recorded, the margin at the first
divergent step tells the two apart.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bitcpm_cli.core.errors import CheckFailed, InputError, collect
from bitcpm_cli.core.formats.results import read_results

REPORT_SCHEMA = "bitcpm.compare/1"
DEFAULT_TIE_MARGIN = 0.1  # nats between the top-1 and top-2 logprob


@dataclass
class Entry:
    id: Any
    prompt: str | None
    token_ids: list[int]
    top_logprobs: list[list[list[float]]] | None = None


@dataclass
class ResultsFile:
    path: str
    meta: dict[str, Any]  # everything but the results (empty for a bare list)
    entries: list[Entry]


@dataclass
class PromptComparison:
    id: Any
    prompt: str | None
    status: str  # "match" | "near-tie" | "diverged" | "only-in-a" | "only-in-b"
    compared: int = 0
    matched: int = 0
    divergence: int | None = None
    token_a: int | None = None
    token_b: int | None = None
    text_a: str | None = None
    text_b: str | None = None
    margin_a: float | None = None
    margin_b: float | None = None
    max_logprob_diff: float | None = None
    max_logprob_diff_at: int | None = None
    explanation: str = ""


@dataclass
class CompareReport:
    a: str
    b: str
    matched_by: str
    max_tokens: int | None
    tie_margin: float
    allow_near_ties: bool
    prompts: list[PromptComparison]
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        allowed = {"match", "near-tie"} if self.allow_near_ties else {"match"}
        return bool(self.prompts) and all(p.status in allowed for p in self.prompts)

    def to_dict(self) -> dict[str, Any]:
        return {"schema": REPORT_SCHEMA, "a": self.a, "b": self.b, "ok": self.ok, "matched_by": self.matched_by,
                "max_tokens": self.max_tokens, "tie_margin": self.tie_margin, "allow_near_ties": self.allow_near_ties,
                "notes": self.notes, "prompts": [asdict(p) for p in self.prompts]}


def load_results(path: str | Path) -> ResultsFile:
    """A bitcpm results file, or a bare list of objects with `token_ids` (the adaptation report's format)."""
    path = Path(path)
    meta, items = read_results(path)
    entries = [Entry(item.get("id", index), item.get("prompt"), item["token_ids"], item.get("top_logprobs"))
               for index, item in enumerate(items)]
    return ResultsFile(str(path), meta, entries)


def _pair(a: ResultsFile, b: ResultsFile, notes: list[str]) -> tuple[str, list[tuple[Entry | None, Entry | None]]]:
    texts_a = [e.prompt for e in a.entries]
    texts_b = [e.prompt for e in b.entries]
    by_text = (None not in texts_a and None not in texts_b and len(set(texts_a)) == len(texts_a)
               and len(set(texts_b)) == len(texts_b) and set(texts_a) & set(texts_b))
    key = (lambda e: e.prompt) if by_text else (lambda e: e.id)
    index_b = {key(e): e for e in b.entries}
    pairs = [(e, index_b.pop(key(e), None)) for e in a.entries] + [(None, e) for e in index_b.values()]
    only_a = sum(1 for x, y in pairs if y is None)
    only_b = sum(1 for x, y in pairs if x is None)
    if only_a or only_b:
        notes.append(f"the files hold different prompts: {only_a} only in A, {only_b} only in B")
    if not by_text and None not in texts_a and None not in texts_b:
        differing = sum(1 for x, y in pairs if x and y and x.prompt != y.prompt)
        if differing:
            notes.append(f"{differing} prompt(s) with the same id have different text")
    return ("prompt text" if by_text else "id"), pairs


def _settings_notes(a: ResultsFile, b: ResultsFile) -> list[str]:
    notes = []
    sa, sb = a.meta.get("sampling") or {}, b.meta.get("sampling") or {}
    for key in ("temperature", "top_p", "seed", "max_new_tokens", "chat_template"):
        if key in sa and key in sb and sa[key] != sb[key]:
            notes.append(f"sampling differs: {key} is {sa[key]} in A and {sb[key]} in B")
    greedy = [s.get("temperature") == 0 for s in (sa, sb) if "temperature" in s]
    if greedy and not all(greedy):
        notes.append("at least one file was not decoded greedily (temperature > 0): token differences are expected")
    ma, mb = a.meta.get("model") or {}, b.meta.get("model") or {}
    if ma.get("fingerprint") and mb.get("fingerprint") and ma["fingerprint"] != mb["fingerprint"]:
        notes.append("the two runs used different weights (model fingerprints differ)")
    if ma.get("dtype") and mb.get("dtype") and ma["dtype"] != mb["dtype"]:
        notes.append(f"dtypes differ: {ma['dtype']} in A, {mb['dtype']} in B")
    if ma.get("activations") and mb.get("activations") and ma["activations"] != mb["activations"]:
        engine_decides = any(m["activations"].startswith("llama.cpp:") for m in (ma, mb))
        notes.append(f"activations: A ran {ma['activations']}, B ran {mb['activations']}" if engine_decides else
                     f"activation schemes differ: {ma['activations']} in A, {mb['activations']} in B")
    ra, rb = a.meta.get("runtime") or {}, b.meta.get("runtime") or {}
    if ra.get("device") and rb.get("device"):
        notes.append(f"devices: A ran on {ra['device']} ({ra.get('device_name')}), B on {rb['device']} "
                     f"({rb.get('device_name')})")
    return notes


def _margin(step: list[list[float]] | None) -> float | None:
    if not step or len(step) < 2:
        return None
    return float(step[0][1]) - float(step[1][1])


def _rank(step: list[list[float]] | None, token: int) -> int | None:
    if not step:
        return None
    return next((r for r, (t, _) in enumerate(step) if int(t) == token), None)


def _compare_pair(ea: Entry, eb: Entry, max_tokens: int | None, tie_margin: float) -> PromptComparison:
    ta, tb = ea.token_ids, eb.token_ids
    if max_tokens is not None:
        ta, tb = ta[:max_tokens], tb[:max_tokens]
    result = PromptComparison(ea.id, ea.prompt, "match", compared=max(len(ta), len(tb)))
    common = min(len(ta), len(tb))
    first = next((i for i in range(common) if ta[i] != tb[i]), None)
    if first is None and len(ta) != len(tb):
        first = common  # one run stopped (EOS) where the other went on
    result.matched = common if first is None else first
    la, lb = ea.top_logprobs, eb.top_logprobs
    if la and lb:
        diffs = [(abs(float(la[i][0][1]) - float(lb[i][0][1])), i)
                 for i in range(min(result.matched, len(la), len(lb))) if la[i] and lb[i]]
        if diffs:
            result.max_logprob_diff, result.max_logprob_diff_at = max(diffs, key=lambda d: d[0])
            result.max_logprob_diff = round(result.max_logprob_diff, 6)
    if first is None:
        result.explanation = f"all {result.compared} tokens identical"
        return result
    result.divergence = first
    result.token_a = ta[first] if first < len(ta) else None
    result.token_b = tb[first] if first < len(tb) else None
    if result.token_a is None or result.token_b is None:
        result.status = "diverged"
        result.explanation = (f"same tokens for {first}, then {'A' if result.token_a is None else 'B'} stopped while "
                              "the other went on")
        return result
    step_a = la[first] if la and first < len(la) else None
    step_b = lb[first] if lb and first < len(lb) else None
    result.margin_a, result.margin_b = _margin(step_a), _margin(step_b)
    if result.margin_a is None or result.margin_b is None:
        result.status = "diverged"
        result.explanation = "diverged; run both with --logprobs K (K >= 2) to tell a near-tie flip from a real bug"
        return result
    # A near tie: each side's chosen token is the other's runner-up, and on both sides the top-2 almost tie.
    swapped = _rank(step_a, result.token_b) == 1 and _rank(step_b, result.token_a) == 1
    if swapped and max(result.margin_a, result.margin_b) < tie_margin:
        result.status = "near-tie"
        result.explanation = (f"near-tie flip: top-1/top-2 margins {result.margin_a:.4f} (A) and "
                              f"{result.margin_b:.4f} (B) < "
                              f"{tie_margin} at token {first}; numerical noise, not a bug")
    else:
        result.status = "diverged"
        result.explanation = (f"real divergence at token {first}: margins {result.margin_a:.4f} (A) and "
                              f"{result.margin_b:.4f} (B), not both below {tie_margin}" if swapped else
                              f"real divergence at token {first}: the tokens are not each other's runner-up")
    return result


def check_options(max_tokens: int | None, tie_margin: float) -> None:
    """compare's numbers, before anything is read: every problem at once."""
    problems = []
    if max_tokens is not None and max_tokens < 1:
        problems.append(f"--max-tokens {max_tokens} must be at least 1 (e.g. --max-tokens 50)")
    if not (math.isfinite(tie_margin) and tie_margin >= 0):
        problems.append(f"--tie-margin {tie_margin} must be a finite number of nats, 0 or more (default "
                        f"{DEFAULT_TIE_MARGIN}); NaN would make every flip a real divergence and inf every flip a tie")
    collect(problems, InputError, "bad compare options", hint="e.g. --max-tokens 50 --tie-margin 0.1")


def compare_results(path_a: str | Path, path_b: str | Path, max_tokens: int | None = None,
                    tie_margin: float = DEFAULT_TIE_MARGIN, allow_near_ties: bool = False,
                    tokenizer: Any = None) -> CompareReport:
    check_options(max_tokens, tie_margin)
    a, b = load_results(path_a), load_results(path_b)
    notes = _settings_notes(a, b)
    matched_by, pairs = _pair(a, b, notes)
    prompts = []
    for ea, eb in pairs:
        if ea is None or eb is None:
            only = ea or eb
            prompts.append(PromptComparison(only.id, only.prompt, "only-in-a" if eb is None else "only-in-b",
                                            explanation="no counterpart in the other file"))
            continue
        comparison = _compare_pair(ea, eb, max_tokens, tie_margin)
        if tokenizer is not None and comparison.divergence is not None:
            decode = lambda t: None if t is None else tokenizer.decode([t])  # noqa: E731
            comparison.text_a, comparison.text_b = decode(comparison.token_a), decode(comparison.token_b)
        prompts.append(comparison)
    return CompareReport(str(path_a), str(path_b), matched_by, max_tokens, tie_margin, allow_near_ties, prompts, notes)


def require_identical(report: CompareReport) -> None:
    """`compare`'s verdict: exit 1 (CheckFailed) unless every prompt matched (near-tie flips too, with
    --allow-near-ties); the report itself is printed first."""
    if report.ok:
        return
    allowed = {"match", "near-tie"} if report.allow_near_ties else {"match"}
    differing = [p for p in report.prompts if p.status not in allowed]
    if not differing:
        raise CheckFailed("no prompt was compared", hint="check that both results files hold the same prompts")
    hint = "the report above explains each divergence"
    if any(p.status == "near-tie" for p in differing):
        hint += "; --allow-near-ties accepts flips between near-tied tokens"
    raise CheckFailed(f"{len(differing)} of {len(report.prompts)} prompt(s) differ", hint=hint,
                      problems=[f"prompt {p.id}: {p.status}" for p in differing][:20] if len(differing) > 1 else ())
