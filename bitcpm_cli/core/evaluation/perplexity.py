"""`bitcpm eval`: what ternarization and each conversion cost, measured on the same token ids.

The corpus is tokenized once, with the reference's tokenizer; every model (float, QAT through its fake quantizer,
fused, packed, GGUF through llama.cpp) scores those ids in sliding windows, one model in memory at a time. The
statistics are those of llama.cpp's `llama-perplexity --kl-divergence` (tools/perplexity/perplexity.cpp), with the
same names and definitions:

- Mean NLL and PPL = exp(mean NLL); the uncertainty of a mean is sqrt(var / (n - 1)) (n > 10), PPL's is PPL times
  that of the mean NLL; the 95 % interval is exp(mean NLL +- 1.96 of it);
- KLD(reference || model) per token, its mean, 99th percentile (linear interpolation) and maximum;
- "Same top p": how often the model's most likely token is the reference's (argmax of the logits);
- "RMS dp": the root mean square of p_model(t) - p_reference(t), t the corpus' next token.

The reference's distributions are kept on disk between models (like llama.cpp's --kl-divergence-base file) as the
log-probabilities of its top-K tokens plus the log of the mass of all others (float32, memory-mapped), i.e.
(8 K + 12) bytes a token whatever the vocabulary. The KLD over those K + 1 outcomes is what is computed: it is exact
(bit for bit) when the two distributions are equal, and otherwise falls short of the full-vocabulary KLD by exactly
p_rest * KLD(reference tail || model tail), where p_rest is the reference's mass outside its top K (reported as
`reference_mass_outside_top_k`). NLL, top-1 and dp use exact values.
"""

from __future__ import annotations

import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from bitcpm_cli.core.errors import CheckFailed, InputError
from bitcpm_cli.core.evaluation.tasks import add_kept, resolve_tasks, run_tasks

EVAL_SCHEMA = "bitcpm.eval/1"
TOP_K = 64
Z95 = 1.959964
ProgressFn = Callable[[str, int, int], None]  # (model label, tokens scored so far, tokens to score)


# ---- windows ---------------------------------------------------------------------------------------------
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


def mean_and_uncertainty(total: float, total2: float, count: int) -> tuple[float, float]:
    """llama.cpp's mean_and_uncertainty: the mean and the standard error of the mean (0 for 10 values or fewer)."""
    if count < 1:
        return 0.0, 0.0
    mean = total / count
    var = total2 / count - mean * mean
    return mean, math.sqrt(var / (count - 1)) if var > 0 and count > 10 else 0.0


# ---- the plan: every check before anything heavy -----------------------------------------------------------
@dataclass
class EvalPlan:
    models: list[Path]  # the reference first
    cards: list[Any]
    data: Path
    context: int
    stride: int
    max_tokens: int | None
    device: str
    dtype: str
    trust_remote_code: bool
    tasks: list[str]
    include_path: Path | None
    max_kld: float | None
    min_top1: float | None
    harness: tuple[Any, list[Any]] | None = None  # (lm_eval TaskManager, task configs) with --tasks


def plan_eval(models: list[str | Path], data: str | Path, *, reference: str | Path | None = None, context: int = 512,
              stride: int | None = None, max_tokens: int | None = None, device: str = "auto",
              dtype: str = "float32", trust_remote_code: bool = False, tasks: list[str] | None = None,
              include_path: str | Path | None = None, max_kld: float | None = None,
              min_top1: float | None = None) -> EvalPlan:
    """Check every input (all problems at once), then read each model's vocabulary and context length without its
    weights: a model that cannot be compared is refused before any model is loaded."""
    from bitcpm_cli.core.engines.registry import engine_for
    from bitcpm_cli.core.model.hf import DTYPES
    from bitcpm_cli.core.training.data import SUFFIXES

    paths = [Path(m) for m in models]
    if reference is not None and Path(reference) in paths:
        paths.remove(Path(reference))
    if reference is not None:
        paths.insert(0, Path(reference))
    stride = context // 2 if stride is None else stride
    problems = []
    if not paths:
        problems.append("no --model given")
    if len(set(paths)) != len(paths):
        problems.append("a model is named twice")
    for path in paths:
        if not path.exists():
            problems.append(f"model not found ({path})")
    data = Path(data)
    if not data.is_file():
        problems.append(f"--data file not found ({data})")
    elif data.suffix not in SUFFIXES:
        problems.append(f"--data {data} is not .txt, .jsonl (a `text` field) or .parquet (a `text` column)")
    if context < 2:
        problems.append(f"--context {context}: need at least 2 tokens")
    elif not 1 <= stride < context:
        problems.append(f"--stride {stride}: need 1 <= stride < --context ({context})")
    if max_tokens is not None and max_tokens < 2:
        problems.append(f"--max-tokens {max_tokens}: need at least 2")
    if dtype not in DTYPES:
        problems.append(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if max_kld is not None and max_kld < 0:
        problems.append(f"--max-kld {max_kld}: need >= 0")
    if min_top1 is not None and not 0 <= min_top1 <= 100:
        problems.append(f"--min-top1 {min_top1}: need a percentage from 0 to 100")
    if (max_kld is not None or min_top1 is not None) and len(paths) < 2:
        problems.append("--max-kld / --min-top1 compare models with the reference: give at least two models")
    if include_path is not None and not tasks:
        problems.append("--include-path is only used with --tasks")
    if include_path is not None and not Path(include_path).is_dir():
        problems.append(f"--include-path folder not found ({include_path})")
    if problems:
        raise InputError(problems[0], hint="fix the options named above", problems=problems if len(problems) > 1
                         else ())
    harness = resolve_tasks(tasks, include_path) if tasks else None
    engines = [engine_for(path) for path in paths]
    for engine in engines:
        engine.require()
    cards = [engine.card(path, trust_remote_code) for engine, path in zip(engines, paths)]
    for card in cards:
        if card.max_context is not None and context > card.max_context:
            problems.append(f"--context {context} is larger than {card.path}'s context length ({card.max_context})")
    for card in cards[1:]:
        mismatch = vocabulary_mismatch(cards[0].tokens, card.tokens)
        if mismatch:
            problems.append(f"{card.path} has another vocabulary than the reference {cards[0].path}: {mismatch}")
    if problems:
        raise InputError(problems[0], hint="compare models that share the reference's tokenizer, with --context "
                                           "within every model's context length",
                         problems=problems if len(problems) > 1 else ())
    return EvalPlan(paths, cards, data, context, stride, max_tokens, device, dtype, trust_remote_code,
                    list(tasks or []), Path(include_path) if include_path else None, max_kld, min_top1, harness)


def vocabulary_mismatch(reference: list[str | None], other: list[str | None]) -> str | None:
    """The first differing token, as a sentence; None when every id means the same token and the logits match."""
    for index, (a, b) in enumerate(zip(reference, other)):
        if a is not None and b is not None and a != b:
            return f"token {index} is {a!r} in the reference, {b!r} here"
    if len(reference) != len(other):
        return f"{len(other)} logits a position, the reference has {len(reference)}"
    return None


# ---- corpus ------------------------------------------------------------------------------------------------
def tokenize_corpus(plan: EvalPlan, folder: Path) -> tuple[np.ndarray, int]:
    """The corpus as token ids (BOS + document + EOS, concatenated, as training packs it), written to a file in
    `folder` and memory-mapped; (ids, documents)."""
    from bitcpm_cli.core.training.data import iter_texts

    card = plan.cards[0]
    path, count, documents = folder / "tokens.int32", 0, 0
    with path.open("wb") as handle:
        for text in iter_texts([plan.data]):
            ids = ([card.bos] if card.bos is not None else []) + card.encode(text)
            ids += [card.eos] if card.eos is not None else []
            if plan.max_tokens is not None:
                ids = ids[:plan.max_tokens - count]
            handle.write(np.asarray(ids, dtype=np.int32).tobytes())
            count, documents = count + len(ids), documents + 1
            if plan.max_tokens is not None and count >= plan.max_tokens:
                break
    if count < 2:
        raise InputError(f"the corpus holds no text to score ({plan.data}: {count} tokens)",
                         hint="pass a file with text (.txt lines, .jsonl `text`, .parquet `text`)")
    return np.memmap(path, dtype=np.int32, mode="r", shape=(count,)), documents


# ---- scoring ---------------------------------------------------------------------------------------------------
class ReferenceStore:
    """The reference's distribution at every scored position: top-K ids and log-probs, the log of the rest's mass,
    the log-prob of the corpus' next token and the argmax. Memory-mapped files in a temporary folder."""

    def __init__(self, folder: Path, positions: int, vocab: int):
        self.k = min(TOP_K, vocab - 1)
        shapes = {"top_ids": ((positions, self.k), np.int32), "top_logp": ((positions, self.k), np.float32),
                  "rest_logp": ((positions,), np.float32), "target_logp": ((positions,), np.float32),
                  "argmax": ((positions,), np.int32)}
        for name, (shape, dtype) in shapes.items():
            setattr(self, name, np.memmap(folder / f"reference-{name}", dtype=dtype, mode="w+", shape=shape))


class Accumulator:
    """Sums for one model (llama.cpp's kl_divergence_result) plus the per-token KLD on disk for its percentiles."""

    def __init__(self, folder: Path, label: str, positions: int, compare: bool):
        self.count = 0
        self.sum_nll = self.sum_nll2 = 0.0
        self.sum_kld = self.sum_kld2 = 0.0
        self.sum_dp = self.sum_dp2 = self.sum_dp4 = 0.0
        self.same_top = 0
        self.rest_mass_max = 0.0
        self.kld = np.memmap(folder / f"kld-{label}", dtype=np.float32, mode="w+", shape=(positions,)) \
            if compare else None


def score_model(session, ids: np.ndarray, plan: EvalPlan, store: ReferenceStore, acc: Accumulator,
                is_reference: bool, vocab: int, label: str, on_progress: ProgressFn) -> None:
    import torch

    total = len(ids) - 1
    for begin, end, first in windows(len(ids), plan.context, plan.stride):
        logits = session.score(ids[begin:end])
        if logits.shape[-1] != vocab:
            raise InputError(f"{label} gives {logits.shape[-1]} logits a position, its vocabulary has {vocab}",
                             hint="check the model's config (vocab_size) against its tokenizer")
        logits = logits[first - 1 - begin:end - 1 - begin]
        j0, j1 = first - 1, end - 1  # positions in the store: token t is scored at t - 1
        targets = torch.from_numpy(np.asarray(ids[first:end], dtype=np.int64)).unsqueeze(1)
        logp = torch.log_softmax(logits.float(), dim=-1)
        target_logp = logp.gather(1, targets).squeeze(1)
        argmax = logits.argmax(dim=-1)
        nll = -target_logp.double()
        acc.count += len(nll)
        acc.sum_nll += float(nll.sum())
        acc.sum_nll2 += float((nll * nll).sum())
        if is_reference:
            top_logp, top_ids = logp.topk(store.k, dim=-1)
            store.top_ids[j0:j1] = top_ids.numpy()
            store.top_logp[j0:j1] = top_logp.numpy()
            store.rest_logp[j0:j1] = logp.scatter_(1, top_ids, -math.inf).logsumexp(-1).numpy()
            store.target_logp[j0:j1] = target_logp.numpy()
            store.argmax[j0:j1] = argmax.numpy()
        else:
            top_ids = torch.from_numpy(np.asarray(store.top_ids[j0:j1], dtype=np.int64))
            p_logp = torch.from_numpy(np.asarray(store.top_logp[j0:j1]))
            q_logp = logp.gather(1, top_ids)
            p_rest = torch.from_numpy(np.asarray(store.rest_logp[j0:j1]))
            q_rest = logp.scatter_(1, top_ids, -math.inf).logsumexp(-1)
            # identical float32 inputs give identical differences, so equal distributions give exactly 0
            kld = ((p_logp.double().exp() * (p_logp - q_logp).double()).sum(-1)
                   + p_rest.double().exp() * (p_rest - q_rest).double())
            acc.kld[j0:j1] = kld.float().numpy()
            acc.sum_kld += float(kld.sum())
            acc.sum_kld2 += float((kld * kld).sum())
            acc.same_top += int((argmax == torch.from_numpy(np.asarray(store.argmax[j0:j1], dtype=np.int64))).sum())
            ref_target = torch.from_numpy(np.asarray(store.target_logp[j0:j1])).double()
            dp = target_logp.double().exp() - ref_target.exp()
            acc.sum_dp += float(dp.sum())
            acc.sum_dp2 += float((dp * dp).sum())
            acc.sum_dp4 += float((dp ** 4).sum())
            acc.rest_mass_max = max(acc.rest_mass_max, float(p_rest.double().exp().max()))
        on_progress(label, j1, total)


def model_statistics(acc: Accumulator) -> dict[str, Any]:
    mean_nll, nll_unc = mean_and_uncertainty(acc.sum_nll, acc.sum_nll2, acc.count)
    ppl = math.exp(mean_nll)
    stats: dict[str, Any] = {
        "tokens": acc.count, "mean_nll": mean_nll, "mean_nll_unc": nll_unc, "ppl": ppl, "ppl_unc": ppl * nll_unc,
        "ppl_95": [math.exp(mean_nll - Z95 * nll_unc), math.exp(mean_nll + Z95 * nll_unc)]}
    if acc.kld is None:
        return stats
    kld_mean, kld_unc = mean_and_uncertainty(acc.sum_kld, acc.sum_kld2, acc.count)
    top = acc.same_top / acc.count
    top_unc = math.sqrt(top * (1 - top) / (acc.count - 1)) if acc.count > 1 else 0.0
    mse, mse_unc = mean_and_uncertainty(acc.sum_dp2, acc.sum_dp4, acc.count)
    rms = math.sqrt(mse)
    values = np.asarray(acc.kld, dtype=np.float64)
    stats["vs_reference"] = {
        "mean_kld": kld_mean, "mean_kld_unc": kld_unc, "median_kld": float(np.median(values)),
        "p99_kld": float(np.percentile(values, 99)), "max_kld": float(values.max()),
        "same_top_pct": 100 * top, "same_top_pct_unc": 100 * top_unc,
        "rms_dp_pct": 100 * rms, "rms_dp_pct_unc": 100 * (0.5 / rms * mse_unc if rms else 0.0),
        "mean_dp_pct": 100 * acc.sum_dp / acc.count, "reference_mass_outside_top_k": acc.rest_mass_max}
    return stats


# ---- the whole evaluation --------------------------------------------------------------------------------------
def run_eval(plan: EvalPlan, on_progress: ProgressFn | None = None) -> dict[str, Any]:
    """Score every model of the plan on the same ids; run the harness tasks when asked. The report (bitcpm.eval/1)."""
    from bitcpm_cli.core.engines.registry import engine_for

    on_progress = on_progress or (lambda label, done, total: None)
    reports: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bitcpm-eval-") as tmp:
        folder = Path(tmp)
        ids, documents = tokenize_corpus(plan, folder)
        vocab = len(plan.cards[0].tokens)
        store = ReferenceStore(folder, len(ids) - 1, vocab)
        for index, path in enumerate(plan.models):
            engine = engine_for(path)
            session = engine.open(path, device=plan.device, dtype=plan.dtype,
                                  trust_remote_code=plan.trust_remote_code, qat_forward=True, context=plan.context)
            try:
                acc = Accumulator(folder, str(index), len(ids) - 1, compare=index > 0)
                began = time.perf_counter()
                score_model(session, ids, plan, store, acc, index == 0, vocab, str(path), on_progress)
                elapsed = time.perf_counter() - began
                entry = {"path": str(path), "engine": engine.name, "format": session.info["format"],
                         "dtype": session.info["dtype"], "fingerprint": session.info["fingerprint"],
                         "reference": index == 0, **model_statistics(acc),
                         "tokens_per_s": round(acc.count / elapsed, 3) if elapsed else None,
                         "notes": list(session.notes)}
                if plan.tasks:
                    entry["tasks"] = run_tasks(session, plan.tasks, plan.harness)
                    if entry["tasks"] is None:
                        entry["notes"].append("tasks not run: lm-evaluation-harness evaluates transformers "
                                              "models, not GGUF files")
                del acc
            finally:
                session.close()
                del session
            reports.append(entry)
        n_tokens = len(ids)
        del ids, store
    if plan.tasks:
        add_kept(reports, plan.tasks)
    notes = [f"KLD over the reference's top {min(TOP_K, vocab - 1)} tokens plus the rest's mass: exact for equal "
             "distributions, otherwise short of the full KLD by at most the reference's mass outside its top "
             "tokens times the tail's KLD"]
    report = {
        "schema": EVAL_SCHEMA, "reference": str(plan.models[0]),
        "data": {"path": str(plan.data), "documents": documents, "tokens": n_tokens, "scored_tokens": n_tokens - 1,
                 "tokenizer": str(plan.models[0])},
        "settings": {"context": plan.context, "stride": plan.stride, "max_tokens": plan.max_tokens,
                     "device": plan.device, "dtype": plan.dtype, "kld_top_k": min(TOP_K, vocab - 1),
                     "tasks": plan.tasks, "include_path": str(plan.include_path) if plan.include_path else None},
        "models": reports,
        "gates": {"max_kld": plan.max_kld, "min_top1": plan.min_top1, "failures": gate_failures(reports, plan)},
        "notes": notes,
    }
    return report


def gate_failures(reports: list[dict[str, Any]], plan: EvalPlan) -> list[str]:
    failures = []
    for entry in reports[1:]:
        versus = entry["vs_reference"]
        if plan.max_kld is not None and versus["mean_kld"] > plan.max_kld:
            failures.append(f"{entry['path']}: mean KLD {versus['mean_kld']:.6f} > --max-kld {plan.max_kld}")
        if plan.min_top1 is not None and versus["same_top_pct"] < plan.min_top1:
            failures.append(f"{entry['path']}: same top token {versus['same_top_pct']:.2f} % < --min-top1 "
                            f"{plan.min_top1}")
    return failures


def check_gates(report: dict[str, Any]) -> None:
    """Exit 1 (CheckFailed) when a model failed --max-kld or --min-top1."""
    failures = report["gates"]["failures"]
    if failures:
        raise CheckFailed(f"{len(failures)} gate(s) failed", hint="the report above shows each model's figures",
                          problems=failures)


def short_names(report: dict[str, Any]) -> Callable[[str], str]:
    """Model paths relative to the folder they share (`fused`, `sft/final`), for tables."""
    import os

    root = os.path.commonpath([str(Path(m["path"]).resolve().parent) for m in report["models"]])

    def name(path: str) -> str:
        return os.path.relpath(Path(path).resolve(), root)

    return name


def markdown_table(report: dict[str, Any]) -> list[str]:
    """The report as a Markdown table (SUMMARY.md)."""
    data, settings = report["data"], report["settings"]
    name = short_names(report)
    lines = [f"{data['scored_tokens']} tokens of `{Path(data['path']).name}`, context {settings['context']}, stride "
             f"{settings['stride']}, {settings['dtype']}; reference: `{name(report['reference'])}`.", "",
             "| model | format | PPL (95 % interval) | mean KLD | 99 % KLD | max KLD | same top % | RMS Δp % |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for m in report["models"]:
        low, high = m["ppl_95"]
        versus = m.get("vs_reference")
        figures = (f"{versus['mean_kld']:.6f} | {versus['p99_kld']:.6f} | {versus['max_kld']:.6f} | "
                   f"{versus['same_top_pct']:.2f} | {versus['rms_dp_pct']:.3f}") if versus else "- | - | - | - | -"
        lines.append(f"| {name(m['path'])} | {m['format']} ({m['engine']}) | {m['ppl']:.3f} ({low:.3f}-{high:.3f}) | "
                     f"{figures} |")
    return lines
