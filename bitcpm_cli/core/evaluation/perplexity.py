"""`bitcpm eval`: what ternarization and each conversion cost, measured on the same token ids.

The corpus is tokenized once, with the reference's tokenizer (BOS where that tokenizer adds it to a plain text); every
model (float, QAT through its fake quantizer, fused, packed, GGUF through llama.cpp) scores those ids, one model in
memory at a time, in sliding windows (`--scoring windows`) or in llama-perplexity's chunks (`--scoring llama.cpp`;
see core/evaluation/scoring.py for both). The
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

from bitcpm_cli.core.errors import BitcpmError, CheckFailed, InputError, QuantError, collect
from bitcpm_cli.core.io.readers import file_problem
from bitcpm_cli.core.evaluation.scoring import (
    PER_TOKEN_SCHEMA,
    SCORING,
    Segment,
    llamacpp_estimate,
    llamacpp_segments,
    per_token_lines,
    read_as_llamacpp,
    scored_positions,
    window_segments,
    windows,
    write_per_token,
)
from bitcpm_cli.core.evaluation.tasks import add_kept, resolve_tasks, run_tasks

EVAL_SCHEMA = "bitcpm.eval/1"
TOP_K = 64
Z95 = 1.959964
ProgressFn = Callable[[str, int, int], None]  # (model label, tokens scored so far, tokens to score)


__all__ = ["check_gates", "markdown_table", "mean_and_uncertainty", "plan_eval", "run_eval", "scheme", "short_names",
           "vocabulary_mismatch", "windows"]


# ---- statistics ------------------------------------------------------------------------------------------
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
    stride: int | None  # None with --scoring llama.cpp
    max_tokens: int | None
    device: str
    dtype: str
    trust_remote_code: bool
    tasks: list[str]
    include_path: Path | None
    max_kld: float | None
    min_top1: float | None
    harness: tuple[Any, list[Any]] | None = None  # (lm_eval TaskManager, task configs) with --tasks
    scoring: str = "windows"  # or "llama.cpp" (core/evaluation/scoring.py)
    per_token: Path | None = None  # --per-token: where the per-token file goes
    overwrite: bool = False  # replace an existing --per-token file
    activations: str | None = None  # --activations: the scheme every model bitcpm runs through transformers runs


def plan_eval(models: list[str | Path], data: str | Path, *, reference: str | Path | None = None, context: int = 512,
              stride: int | None = None, max_tokens: int | None = None, device: str = "auto",
              dtype: str = "float32", trust_remote_code: bool = False, tasks: list[str] | None = None,
              include_path: str | Path | None = None, max_kld: float | None = None,
              min_top1: float | None = None, scoring: str = "windows", per_token: str | Path | None = None,
              overwrite: bool = False, activations: str | None = None) -> EvalPlan:
    """Check every input (all problems at once), then read each model's vocabulary and context length without its
    weights: a model that cannot be compared is refused before any model is loaded, and so is a model whose
    activation scheme (its own, or the `activations` override) cannot run."""
    from bitcpm_cli.core.engines.base import check_activations_option
    from bitcpm_cli.core.engines.registry import engine_for

    paths = [Path(m) for m in models]
    if reference is not None and Path(reference) in paths:
        paths.remove(Path(reference))
    if reference is not None:
        paths.insert(0, Path(reference))
    problems = _model_problems(paths, Path(data), scoring)
    problems += _setting_problems(context, stride, max_tokens, dtype, scoring)
    problems += _gate_problems(max_kld, min_top1, len(paths))
    try:
        check_activations_option(activations)
    except InputError as exc:
        problems.append(exc.message)
    if include_path is not None and not tasks:
        problems.append("--include-path is only used with --tasks")
    if include_path is not None and not Path(include_path).is_dir():
        problems.append(f"--include-path folder not found ({include_path})")
    if problems:
        raise InputError(problems[0], hint="fix the options named above", problems=problems if len(problems) > 1
                         else ())
    stride = (context // 2 if stride is None else stride) if scoring == "windows" else None
    harness = resolve_tasks(tasks, include_path, trust_remote_code) if tasks else None
    engines = [engine_for(path) for path in paths]
    for engine in engines:
        engine.require()
    refused = []  # every model's activation problems, all at once
    for engine, path in zip(engines, paths):
        try:
            engine.check_activations(path, _override(engine, activations))
        except BitcpmError as exc:
            refused.append(exc)
    if len(refused) == 1:
        raise refused[0]
    collect([p for exc in refused for p in (exc.problems or [exc.message])], QuantError,
            f"{len(refused)} models cannot be run as given",
            "fix the problems named above (`bitcpm fix-config` repairs config.json fields that disagree with the "
            "weights; --activations picks another activation scheme)")
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
    return EvalPlan(paths, cards, Path(data), context, stride, max_tokens, device, dtype, trust_remote_code,
                    list(tasks or []), Path(include_path) if include_path else None, max_kld, min_top1, harness,
                    scoring, Path(per_token) if per_token is not None else None, overwrite, activations)


def _override(engine, activations: str | None) -> str | None:
    """The --activations override for one model: none for an engine that decides activations itself."""
    return None if engine.decides_activations else activations


def _model_problems(paths: list[Path], data: Path, scoring: str) -> list[str]:
    from bitcpm_cli.core.training.data import SUFFIXES

    problems = []
    if not paths:
        problems.append("no --model given")
    if len(set(paths)) != len(paths):
        problems.append("a model is named twice")
    for path in paths:
        if not path.exists():
            problems.append(f"model not found ({path})")
    if problem := file_problem(data, "--data file"):
        problems.append(problem)
    elif scoring == "llama.cpp" and data.suffix != ".txt":
        problems.append(f"--scoring llama.cpp reads --data as one plain text file, as llama-perplexity -f does: "
                        f"{data} is not a .txt file")
    elif data.suffix not in SUFFIXES:
        problems.append(f"--data {data} is not .txt, .jsonl (a `text` field) or .parquet (a `text` column)")
    return problems


def _setting_problems(context: int, stride: int | None, max_tokens: int | None, dtype: str, scoring: str) -> list[str]:
    from bitcpm_cli.core.model.hf import DTYPES

    problems = []
    if scoring not in SCORING:
        problems.append(f"--scoring {scoring!r} is not one of {', '.join(SCORING)}")
    elif scoring == "llama.cpp":
        if context < 3:
            problems.append(f"--context {context}: --scoring llama.cpp scores the tokens after a chunk's first half "
                            "but the last, so it needs at least 3")
        if stride is not None:
            problems.append("--stride is for --scoring windows: llama.cpp's chunks do not overlap")
    elif context < 2:
        problems.append(f"--context {context}: need at least 2 tokens")
    elif stride is not None and not 1 <= stride < context:
        problems.append(f"--stride {stride}: need 1 <= stride < --context ({context})")
    if max_tokens is not None and max_tokens < 2:
        problems.append(f"--max-tokens {max_tokens}: need at least 2")
    if dtype not in DTYPES:
        problems.append(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    return problems


def _gate_problems(max_kld: float | None, min_top1: float | None, models: int) -> list[str]:
    """A gate that could never fire (NaN, infinity) or means nothing (a negative KLD, a percentage outside 0-100)."""
    problems = []
    if max_kld is not None and not (math.isfinite(max_kld) and max_kld >= 0):
        problems.append(f"--max-kld {max_kld}: need a finite number >= 0 (a mean KLD in nats)")
    if min_top1 is not None and not (math.isfinite(min_top1) and 0 <= min_top1 <= 100):
        problems.append(f"--min-top1 {min_top1}: need a percentage from 0 to 100")
    if (max_kld is not None or min_top1 is not None) and models < 2:
        problems.append("--max-kld / --min-top1 compare models with the reference: give at least two models")
    return problems


def vocabulary_mismatch(reference: list[str | None], other: list[str | None]) -> str | None:
    """The first differing token, as a sentence; None when every id means the same token and the logits match."""
    for index, (a, b) in enumerate(zip(reference, other)):
        if a is not None and b is not None and a != b:
            return f"token {index} is {a!r} in the reference, {b!r} here"
    if len(reference) != len(other):
        return f"{len(other)} logits a position, the reference has {len(reference)}"
    return None


# ---- corpus ------------------------------------------------------------------------------------------------
def tokenize_corpus(plan: EvalPlan, folder: Path) -> tuple[np.ndarray, int | None]:
    """The corpus as token ids, memory-mapped from a file in `folder`; (ids, documents). `windows`: BOS (where the
    reference's tokenizer adds it to a plain text) + document + EOS, concatenated, as `bitcpm train` packs them;
    `llama.cpp`: the file as one string, as llama-perplexity tokenizes it (documents: None)."""
    from bitcpm_cli.core.training.data import iter_texts

    card = plan.cards[0]
    bos = card.bos if card.add_bos else None
    path, count, documents = folder / "tokens.int32", 0, 0
    if plan.scoring == "llama.cpp":
        ids = read_as_llamacpp(plan.data, card.encode, bos, plan.max_tokens, plan.context)
        ids.tofile(path)
        return np.memmap(path, dtype=np.int32, mode="r", shape=(len(ids),)), None
    with path.open("wb") as handle:
        for text in iter_texts([plan.data]):
            ids = ([bos] if bos is not None else []) + card.encode(text)
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


def segments(ids: np.ndarray, plan: EvalPlan) -> Iterator[Segment]:
    """The forward passes of the plan's scoring scheme (core/evaluation/scoring.py)."""
    if plan.scoring == "llama.cpp":
        card = plan.cards[0]
        return llamacpp_segments(ids, plan.context, card.bos if card.add_bos else None)
    return window_segments(ids, plan.context, plan.stride)


# ---- scoring ---------------------------------------------------------------------------------------------------
class ReferenceStore:
    """The reference's distribution at every scored position: top-K ids and log-probs, the log of the rest's mass,
    the log-prob of the corpus' next token and the argmax. Memory-mapped files in a temporary folder; with
    --per-token also where each scored token is (its position in the corpus, its chunk)."""

    def __init__(self, folder: Path, positions: int, vocab: int, per_token: bool = False):
        self.k = min(TOP_K, vocab - 1)
        shapes = {"top_ids": ((positions, self.k), np.int32), "top_logp": ((positions, self.k), np.float32),
                  "rest_logp": ((positions,), np.float32), "target_logp": ((positions,), np.float32),
                  "argmax": ((positions,), np.int32)}
        if per_token:
            shapes.update({"position": ((positions,), np.int64), "chunk": ((positions,), np.int32),
                           "target": ((positions,), np.int32)})
        for name, (shape, dtype) in shapes.items():
            setattr(self, name, np.memmap(folder / f"reference-{name}", dtype=dtype, mode="w+", shape=shape))
        self.per_token = per_token


class Accumulator:
    """Sums for one model (llama.cpp's kl_divergence_result) plus the per-token KLD on disk for its percentiles;
    with --per-token also each token's NLL and top-token agreement."""

    def __init__(self, folder: Path, label: str, positions: int, compare: bool, per_token: bool = False):
        self.count = 0
        self.sum_nll = self.sum_nll2 = 0.0
        self.sum_kld = self.sum_kld2 = 0.0
        self.sum_dp = self.sum_dp2 = self.sum_dp4 = 0.0
        self.same_top = 0
        self.rest_mass_max = 0.0
        self.running_ppl: list[float] = []  # exp(mean NLL so far) after each pass, as llama-perplexity prints it

        def array(name: str, dtype: Any, wanted: bool):
            return np.memmap(folder / f"{name}-{label}", dtype=dtype, mode="w+", shape=(positions,)) if wanted \
                else None

        self.kld = array("kld", np.float32, compare)
        self.nll = array("nll", np.float64, per_token)
        self.same = array("same", np.int8, per_token and compare)


def score_model(session, ids: np.ndarray, plan: EvalPlan, store: ReferenceStore, acc: Accumulator,
                is_reference: bool, vocab: int, label: str, on_progress: ProgressFn) -> None:
    import torch

    total = scored_positions(len(ids), plan.scoring, plan.context)
    j0 = 0
    for segment in segments(ids, plan):
        logits = session.score(segment.inputs)
        if logits.shape[-1] != vocab:
            raise InputError(f"{label} gives {logits.shape[-1]} logits a position, its vocabulary has {vocab}",
                             hint="check the model's config (vocab_size) against its tokenizer")
        logits = logits[segment.row0:segment.row1]
        j1 = j0 + len(segment.targets)  # positions in the store, in scoring order
        targets = torch.from_numpy(np.asarray(segment.targets, dtype=np.int64)).unsqueeze(1)
        logp = torch.log_softmax(logits.float(), dim=-1)
        target_logp = logp.gather(1, targets).squeeze(1)
        argmax = logits.argmax(dim=-1)
        nll = -target_logp.double()
        acc.count += len(nll)
        acc.sum_nll += float(nll.sum())
        acc.sum_nll2 += float((nll * nll).sum())
        acc.running_ppl.append(math.exp(acc.sum_nll / acc.count))
        if acc.nll is not None:
            acc.nll[j0:j1] = nll.numpy()
        if is_reference:
            _store_reference(store, j0, j1, logp, target_logp, argmax, segment)
        else:
            _compare(store, acc, j0, j1, logp, target_logp, argmax)
        on_progress(label, j1, total)
        j0 = j1


def _store_reference(store: ReferenceStore, j0: int, j1: int, logp, target_logp, argmax, segment: Segment) -> None:
    top_logp, top_ids = logp.topk(store.k, dim=-1)
    store.top_ids[j0:j1] = top_ids.numpy()
    store.top_logp[j0:j1] = top_logp.numpy()
    store.rest_logp[j0:j1] = logp.scatter_(1, top_ids, -math.inf).logsumexp(-1).numpy()
    store.target_logp[j0:j1] = target_logp.numpy()
    store.argmax[j0:j1] = argmax.numpy()
    if store.per_token:
        store.position[j0:j1] = np.arange(segment.position, segment.position + j1 - j0)
        store.chunk[j0:j1] = segment.chunk
        store.target[j0:j1] = segment.targets


def _compare(store: ReferenceStore, acc: Accumulator, j0: int, j1: int, logp, target_logp, argmax) -> None:
    """KLD(reference || model) over the reference's top K + the rest, top-token agreement and dp for one pass."""
    import torch

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
    same = argmax == torch.from_numpy(np.asarray(store.argmax[j0:j1], dtype=np.int64))
    acc.same_top += int(same.sum())
    if acc.same is not None:
        acc.same[j0:j1] = same.numpy().astype(np.int8)
    ref_target = torch.from_numpy(np.asarray(store.target_logp[j0:j1])).double()
    dp = target_logp.double().exp() - ref_target.exp()
    acc.sum_dp += float(dp.sum())
    acc.sum_dp2 += float((dp * dp).sum())
    acc.sum_dp4 += float((dp ** 4).sum())
    acc.rest_mass_max = max(acc.rest_mass_max, float(p_rest.double().exp().max()))


def model_statistics(acc: Accumulator, scoring: str = "windows") -> dict[str, Any]:
    mean_nll, nll_unc = mean_and_uncertainty(acc.sum_nll, acc.sum_nll2, acc.count)
    ppl = math.exp(mean_nll)
    stats: dict[str, Any] = {
        "tokens": acc.count, "mean_nll": mean_nll, "mean_nll_unc": nll_unc, "ppl": ppl, "ppl_unc": ppl * nll_unc,
        "ppl_95": [math.exp(mean_nll - Z95 * nll_unc), math.exp(mean_nll + Z95 * nll_unc)]}
    if scoring == "llama.cpp":  # what llama-perplexity prints: [1]ppl,[2]ppl,... and its final estimate
        stats["llama_cpp"] = {**llamacpp_estimate(acc.sum_nll, acc.sum_nll2, acc.count),
                              "chunks": len(acc.running_ppl), "running_ppl": acc.running_ppl}
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
    """Score every model of the plan on the same ids; run the harness tasks when asked; write --per-token. The report
    (bitcpm.eval/1)."""
    on_progress = on_progress or (lambda label, done, total: None)
    reports: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bitcpm-eval-") as tmp:
        folder = Path(tmp)
        ids, documents = tokenize_corpus(plan, folder)
        vocab = len(plan.cards[0].tokens)
        positions = scored_positions(len(ids), plan.scoring, plan.context)
        store = ReferenceStore(folder, positions, vocab, per_token=plan.per_token is not None)
        kept: list[Accumulator] = []
        for index, path in enumerate(plan.models):
            entry, acc = _score_one(plan, index, path, ids, store, vocab, folder, on_progress)
            reports.append(entry)
            if plan.per_token is not None:
                kept.append(acc)
            del acc
        if plan.per_token is not None:
            _write_per_token(plan, store, kept, len(ids))
        n_tokens = len(ids)
        del ids, store, kept
    if plan.tasks:
        add_kept(reports, plan.tasks)
    return _report(plan, reports, documents, n_tokens, positions, vocab)


def _score_one(plan: EvalPlan, index: int, path: Path, ids: np.ndarray, store: ReferenceStore, vocab: int,
               folder: Path, on_progress: ProgressFn) -> tuple[dict[str, Any], Accumulator]:
    """Open one model, score it, close it; (its report entry, its sums)."""
    from bitcpm_cli.core.engines.registry import engine_for

    engine = engine_for(path)
    session = engine.open(path, device=plan.device, dtype=plan.dtype, trust_remote_code=plan.trust_remote_code,
                          qat_forward=True, context=plan.context, activations=_override(engine, plan.activations))
    try:
        acc = Accumulator(folder, str(index), store.argmax.shape[0], compare=index > 0,
                          per_token=plan.per_token is not None)
        began = time.perf_counter()
        score_model(session, ids, plan, store, acc, index == 0, vocab, str(path), on_progress)
        elapsed = time.perf_counter() - began
        entry = {"path": str(path), "engine": engine.name, "format": session.info["format"],
                 "dtype": session.info["dtype"], "fingerprint": session.info["fingerprint"],
                 "activations": session.info.get("activations", "none"),
                 "reference": index == 0, **model_statistics(acc, plan.scoring),
                 "tokens_per_s": round(acc.count / elapsed, 3) if elapsed else None,
                 "notes": list(session.notes)}
        if plan.activations is not None and engine.decides_activations:
            entry["notes"].append(f"--activations {plan.activations} does not apply: {engine.name} quantizes "
                                  f"activations by the weights' tensor type ({entry['activations']})")
        if plan.tasks:
            entry["tasks"] = run_tasks(session, plan.tasks, plan.harness)
            if entry["tasks"] is None:
                entry["notes"].append("tasks not run: lm-evaluation-harness evaluates transformers "
                                      "models, not GGUF files")
    finally:
        session.close()
        del session
    return entry, acc


def _write_per_token(plan: EvalPlan, store: ReferenceStore, kept: list[Accumulator], n_tokens: int) -> None:
    header = {"schema": PER_TOKEN_SCHEMA, "scoring": plan.scoring, "data": str(plan.data), "tokens": n_tokens,
              "scored_tokens": int(store.position.shape[0]), "context": plan.context, "stride": plan.stride,
              "add_bos": plan.cards[0].add_bos, "tokenizer": str(plan.models[0]),
              "models": [str(m) for m in plan.models], "reference": str(plan.models[0])}
    lines = per_token_lines(header, store.position, store.chunk, store.target, [a.nll for a in kept],
                            [a.kld for a in kept], [a.same for a in kept])
    inputs = [*plan.models, plan.data, plan.include_path]
    write_per_token(plan.per_token, inputs, plan.overwrite, lines)


def _report(plan: EvalPlan, reports: list[dict[str, Any]], documents: int | None, n_tokens: int, positions: int,
            vocab: int) -> dict[str, Any]:
    notes = [(f"KLD over the reference's top {min(TOP_K, vocab - 1)} tokens plus the rest's mass: exact for equal "
              "distributions, otherwise short of the full KLD by at most the reference's mass outside its top "
              "tokens times the tail's KLD")]
    reference = plan.cards[0]
    for card in plan.cards[1:]:
        if card.add_bos != reference.add_bos:
            notes.append(f"{card.path}'s tokenizer {'adds' if card.add_bos else 'adds no'} BOS to a plain text, the "
                         f"reference's {'does' if reference.add_bos else 'does not'}: every model scored the "
                         "reference's tokens")
    data = {"path": str(plan.data), "documents": documents, "tokens": n_tokens, "scored_tokens": positions,
            "tokenizer": str(plan.models[0]), "add_bos": reference.add_bos}
    if plan.scoring == "llama.cpp":
        data["chunks"] = n_tokens // plan.context
    return {
        "schema": EVAL_SCHEMA, "reference": str(plan.models[0]), "data": data,
        "settings": {"scoring": plan.scoring, "context": plan.context, "stride": plan.stride,
                     "max_tokens": plan.max_tokens, "device": plan.device, "dtype": plan.dtype,
                     "activations": plan.activations,
                     "kld_top_k": min(TOP_K, vocab - 1), "tasks": plan.tasks,
                     "include_path": str(plan.include_path) if plan.include_path else None,
                     "per_token": str(plan.per_token) if plan.per_token is not None else None},
        "models": reports,
        "gates": {"max_kld": plan.max_kld, "min_top1": plan.min_top1, "failures": gate_failures(reports, plan)},
        "notes": notes,
    }


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


def scheme(settings: dict[str, Any]) -> str:
    """How the tokens were scored, in a few words (table titles)."""
    if settings.get("scoring") == "llama.cpp":
        return "llama-perplexity's chunks (second halves scored)"
    return f"stride {settings['stride']}"


def markdown_table(report: dict[str, Any]) -> list[str]:
    """The report as a Markdown table (SUMMARY.md)."""
    data, settings = report["data"], report["settings"]
    name = short_names(report)
    lines = [(f"{data['scored_tokens']} tokens of `{Path(data['path']).name}`, context {settings['context']}, "
              f"{scheme(settings)}, {settings['dtype']}; reference: `{name(report['reference'])}`."), "",
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
