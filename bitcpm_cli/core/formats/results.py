"""The results file (schema bitcpm.results/1) in one place: its builder (`results_document`, used by every engine), its
reader (`read_results`: checked field by field, or a bare list of results) and its writer (`write_results`).
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Any, Iterable

from bitcpm_cli.core.errors import InputError
from bitcpm_cli.core.io.outputs import write_json
from bitcpm_cli.core.io.readers import is_int, read_json_file

RESULTS_SCHEMA = "bitcpm.results/1"
MAX_TOKEN_ID = 2**31 - 1


def results_document(model: dict[str, Any], runtime: dict[str, Any], sampling: dict[str, Any],
                     results: list[dict[str, Any]], total_time: float, notes: list[str]) -> dict[str, Any]:
    """The results JSON (bitcpm.results/1) of any engine: model (path, fingerprint, dtype, format and, since
    activation schemes, `activations`: the scheme its quantized linears ran, absent in older files), runtime,
    sampling, per-prompt results, summary."""
    total_tokens = sum(r["num_tokens"] for r in results)
    return {
        "schema": RESULTS_SCHEMA, "model": model, "runtime": runtime, "sampling": sampling, "results": results,
        "summary": {"prompts": len(results), "total_tokens": total_tokens, "total_time_s": round(total_time, 6),
                    "tokens_per_s": round(total_tokens / total_time, 3) if total_time else None,
                    "ms_per_token": round(1000 * total_time / total_tokens, 3) if total_tokens else None},
        "notes": notes,
    }


def write_results(document: dict[str, Any], output: str | Path, inputs: Iterable[str | Path | None] = (),
                  overwrite: bool = False, what: str = "--output") -> None:
    """A results document written through the output guard (strict JSON; claimed, staged, renamed into place)."""
    write_json(document, output, inputs, overwrite=overwrite, what=what)


# ---- results files (bitcpm.results/1) -------------------------------------------------------------
def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _token_list(value: Any) -> bool:
    return isinstance(value, list) and all(is_int(t) and 0 <= t <= MAX_TOKEN_ID for t in value)


def _check_result(item: Any, where: str, problems: list[str]) -> None:
    if not isinstance(item, dict):
        problems.append(f"{where}: must be an object with token_ids")
        return
    if not _token_list(item.get("token_ids")):
        problems.append(f"{where}.token_ids: must be a list of integer token ids in [0, {MAX_TOKEN_ID}]")
    if "id" in item and not (is_int(item["id"]) or isinstance(item["id"], str)):
        problems.append(f"{where}.id: must be an integer or a string, got {type(item['id']).__name__}")
    if item.get("prompt") is not None and not isinstance(item["prompt"], str):
        problems.append(f"{where}.prompt: must be a string, got {type(item['prompt']).__name__}")
    if item.get("text") is not None and not isinstance(item["text"], str):
        problems.append(f"{where}.text: must be a string")
    if item.get("prompt_token_ids") is not None and not _token_list(item["prompt_token_ids"]):
        problems.append(f"{where}.prompt_token_ids: must be a list of integer token ids")
    for key in ("num_tokens",):
        if item.get(key) is not None and not (is_int(item[key]) and item[key] >= 0):
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
        else:
            _check_logprobs(steps, item.get("token_ids"), where, problems)


LOGPROB_SLACK = 1e-6  # float rounding of log_softmax's largest entry; anything above is not a log-probability


def _check_logprobs(steps: list, token_ids: Any, where: str, problems: list[str]) -> None:
    """One step per generated token, and log-probabilities that are log-probabilities (at most 0)."""
    if isinstance(token_ids, list) and len(steps) != len(token_ids):
        problems.append(f"{where}.top_logprobs: {len(steps)} step(s) for {len(token_ids)} token_ids; a results file "
                        "holds one step per generated token")
    positive = [(index, pair[1]) for index, step in enumerate(steps) for pair in step if pair[1] > LOGPROB_SLACK]
    if positive:
        index, value = positive[0]
        problems.append(f"{where}.top_logprobs[{index}]: logprob {value} is above 0 ({len(positive)} such value(s)); "
                        "a log-probability is at most 0")


def _check_meta(data: dict[str, Any], path: Path, problems: list[str]) -> None:
    schema = data.get("schema")
    if schema != RESULTS_SCHEMA:
        problems.append(f"schema: {schema!r} is not {RESULTS_SCHEMA!r}" if schema is not None else
                        f"schema: missing (expected {RESULTS_SCHEMA!r})")
    for block in ("model", "runtime", "sampling", "summary"):
        if data.get(block) is not None and not isinstance(data[block], dict):
            problems.append(f"{block}: must be an object")
    model = data.get("model") if isinstance(data.get("model"), dict) else {}
    if model.get("activations") is not None and not isinstance(model["activations"], str):
        problems.append("model.activations: must be a string (the activation scheme the model ran with)")
    sampling = data.get("sampling") if isinstance(data.get("sampling"), dict) else {}
    for key in ("temperature", "top_p"):
        if key in sampling and not _finite(sampling[key]):
            problems.append(f"sampling.{key}: must be a finite number")
    for key in ("seed", "max_new_tokens"):
        if key in sampling and sampling[key] is not None and not is_int(sampling[key]):
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
