"""`quickstart`: the whole toolchain on a tiny BitCPM-shaped model, on the CPU, in a few minutes.

build the tiny model -> train (ternary QAT, with Q8_K activations as llama.cpp runs TQ2_0) -> sft -> convert (fused,
packed) -> infer on the QAT checkpoint and on the fused model -> compare -> loss plot and SUMMARY.md. It calls the same core functions as the commands.
"""

from __future__ import annotations

import importlib.util
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import yaml
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from bitcpm_cli.core.conversion.formats import convert
from bitcpm_cli.core.engines.base import Prompt
from bitcpm_cli.core.engines.registry import generate
from bitcpm_cli.core.errors import CheckFailed, InputError
from bitcpm_cli.core.evaluation.compare import compare_results
from bitcpm_cli.core.evaluation.perplexity import markdown_table, plan_eval, run_eval
from bitcpm_cli.core.formats.results import write_results
from bitcpm_cli.core.io.outputs import OutputGuard, write_json
from bitcpm_cli.core.io.readers import special_kind
from bitcpm_cli.core.model.hf import quiet_transformers
from bitcpm_cli.core.training.callbacks import METRICS_FILE, plot_losses
from bitcpm_cli.core.training.recipe import TrainConfig, resolve_config
from bitcpm_cli.core.training.sft import SftConfig, fine_tune
from bitcpm_cli.core.training.train import train

ASSETS = Path(__file__).resolve().parents[2] / "configs" / "quickstart"


# Held-out prompts (absent from the shipped corpus and chats) and the answers a working model gives: counting for
# the pre-trained checkpoint, chats for the fine-tuned one (which has learned to stop after its reply).
HELD_OUT_STARTS = (23, 88, 141)  # no corpus line starts here (scripts/build_quickstart_assets.py)
COUNTING = [("23 24 25 26", "27 28 29 30"), ("141 142 143 144", "145 146 147 148")]
CHATS = [("continue: 47 48 49", "50 51 52"), ("continue: 116 117 118", "119 120 121"),
         ("continue: 170 171 172", "173 174 175")]
StageFn = Callable[[str, str], None]  # (stage, "start" | detail when done)
EventFn = Callable[[dict[str, Any]], None]  # a training step or phase, as `train` reports it


@dataclass
class QuickstartResult:
    output_dir: str
    stages: list[tuple[str, float, str]] = field(default_factory=list)  # (stage, seconds, detail)
    generations: list[dict[str, Any]] = field(default_factory=list)
    sizes: dict[str, int] = field(default_factory=dict)
    losses: dict[str, tuple[float, float]] = field(default_factory=dict)
    identical: bool = False
    evaluation: dict[str, Any] | None = None  # the eval stage's report (bitcpm.eval/1)
    notes: list[str] = field(default_factory=list)

    @property
    def correct(self) -> bool:
        return bool(self.generations) and all(g["correct"] for g in self.generations)


def _weights_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def run_quickstart(output_dir: str | Path, on_stage: StageFn | None = None,
                   on_event: EventFn | None = None) -> QuickstartResult:
    """The pipeline; on_stage sees each stage start and finish, on_event the training steps (as `train` reports)."""
    output = Path(output_dir)
    if not (ASSETS / "model.yaml").is_file():
        raise InputError(f"the quickstart assets are missing ({ASSETS})",
                         hint="run from a clone of the bitcpm repository installed with `pip install -e .`")
    if output.exists() and not output.is_dir():
        raise InputError(f"--output-dir is {special_kind(output) or 'a file'}, not a folder ({output})",
                         hint="pass a new or empty folder")
    if output.exists() and any(output.iterdir()):
        raise InputError(f"{output} is not empty", hint="remove it or pass another --output-dir")
    guard = OutputGuard(output, [ASSETS], overwrite=True, kind="dir", what="--output-dir", staged=False)
    guard.claim()
    result = QuickstartResult(str(output))
    try:
        _pipeline(output, result, on_stage or (lambda stage, detail: None), on_event)
    except CheckFailed:
        guard.commit()  # the run completed: its outputs explain what went wrong
        raise
    except BaseException as exc:
        for child in list(output.iterdir()) if output.is_dir() else []:  # the folder was empty or new
            shutil.rmtree(child, ignore_errors=True) if child.is_dir() else child.unlink(missing_ok=True)
        guard.abort(exc)  # a failed run leaves nothing behind (the folder too, when this run created it)
        raise
    guard.commit()
    return result


@dataclass
class _Run:
    """What the stages share: the output folder and its subfolders, the result they fill in, the training events."""
    output: Path
    result: QuickstartResult
    on_event: EventFn | None = None
    base: Path = field(init=False)
    pretrain: Path = field(init=False)
    sft: Path = field(init=False)
    fused: Path = field(init=False)
    packed: Path = field(init=False)

    def __post_init__(self) -> None:
        self.base, self.pretrain, self.sft, self.fused, self.packed = (
            self.output / n for n in ("base", "pretrain", "sft", "fused", "packed"))

    @property
    def gguf_file(self) -> Path:
        return self.output / "model-tq2_0.gguf"

    def llama_cpp_ready(self) -> bool:
        """The GGUF file was written and llama.cpp's Python binding is installed."""
        return self.gguf_file.exists() and importlib.util.find_spec("llama_cpp") is not None


def _stage(run: _Run, on_stage: StageFn, name: str, work: Callable[[_Run], str]) -> None:
    on_stage(name, "start")
    began = time.perf_counter()
    detail = work(run)
    run.result.stages.append((name, time.perf_counter() - began, detail))
    on_stage(name, detail)


def _build(run: _Run) -> str:
    values = yaml.safe_load((ASSETS / "model.yaml").read_text())
    values.pop("model_type", None)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**values))
    model.save_pretrained(run.base)
    AutoTokenizer.from_pretrained(ASSETS / "tokenizer", trust_remote_code=False).save_pretrained(run.base)
    return f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, {values['num_hidden_layers']} layers"


def _pretrain(run: _Run) -> str:
    config = resolve_config(TrainConfig, ASSETS / "train.yaml", {
        "model": str(run.base), "data": [str(ASSETS / "corpus.txt")], "output_dir": str(run.pretrain)})
    trained = train(config, on_event=run.on_event)
    run.result.losses["pretrain"] = (trained.first_loss, trained.last_loss)
    return f"{trained.steps} steps, loss {trained.first_loss:.3f} -> {trained.last_loss:.3f}"


def _fine_tune(run: _Run) -> str:
    config = resolve_config(SftConfig, ASSETS / "sft.yaml", {
        "model": str(run.pretrain / "final"), "data": [str(ASSETS / "chat.jsonl")], "output_dir": str(run.sft)})
    tuned = fine_tune(config, on_event=run.on_event)
    run.result.losses["sft"] = (tuned.first_loss, tuned.last_loss)
    return f"{tuned.steps} steps, loss {tuned.first_loss:.3f} -> {tuned.last_loss:.3f}"


def _convert(run: _Run) -> str:
    result, qat = run.result, run.sft / "final"
    fused_run = convert("fused", qat, run.fused, verify=True)
    packed_run = convert("packed", qat, run.packed, verify=True)
    result.sizes = {"QAT checkpoint (fp32 latent)": _weights_size(qat), "fused (bf16)": _weights_size(run.fused),
                    "packed (2-bit codes + scales)": _weights_size(run.packed)}
    result.notes.append(f"packed linears are {packed_run.linear_ratio_vs_bf16:.2f}x smaller than bf16; "
                        f"{fused_run.verify.tensors_checked} tensors verified")
    if importlib.util.find_spec("gguf") is None:
        result.notes.append("GGUF export skipped: install the `gguf` extra (pip install -e '.[gguf]')")
    else:
        exported = convert("gguf", qat, run.gguf_file)
        result.sizes["GGUF TQ2_0 (whole file)"] = exported.bytes_out
        result.notes.append(f"GGUF TQ2_0: {exported.ternary_tensors} ternary tensors, read back exactly")
    return ", ".join(f"{name} {size / 2**20:.1f} MiB" for name, size in result.sizes.items())


def _generate(run: _Run, model: Path, pairs: list[tuple[str, str]], chat: bool, name: str) -> list[dict[str, Any]]:
    """Greedy replies to the pairs' prompts, written as `results-<name>.json` (as `bitcpm infer` writes them)."""
    prompts = [Prompt(i, text=p) for i, (p, _) in enumerate(pairs)]
    document = generate(model, prompts, device="cpu", dtype="bfloat16", max_new_tokens=8, chat=chat)
    write_results(document, run.output / f"results-{name}.json")
    return document["results"]


def _infer(run: _Run) -> str:
    result = run.result
    checks = [(run.pretrain / "final", COUNTING, False, "pretrain", "pre-trained (QAT)"),
              (run.sft / "final", CHATS, True, "qat", "fine-tuned (QAT)")]
    for folder, pairs, chat, name, label in checks:
        for (prompt, expected), generated in zip(pairs, _generate(run, folder, pairs, chat, name)):
            text = generated["text"].strip()
            # a chat reply must be exactly the answer (and stop); a continuation must start with it
            correct = text == expected if chat else text.startswith(expected)
            result.generations.append({"model": label, "prompt": prompt, "expected": expected,
                                       "generated": text, "correct": correct})
    _generate(run, run.fused, CHATS, True, "fused")
    right = sum(g["correct"] for g in result.generations)
    return f"{right}/{len(result.generations)} held-out prompts answered correctly"


def _compare(run: _Run) -> str:
    output, result = run.output, run.result
    report = compare_results(output / "results-qat.json", output / "results-fused.json")
    write_json(report.to_dict(), output / "compare.json")
    result.identical = report.ok
    same = sum(p.status == "match" for p in report.prompts)
    detail = f"QAT checkpoint vs fused model: {same}/{len(report.prompts)} prompts token-identical"
    if run.llama_cpp_ready():
        _generate(run, run.gguf_file, CHATS, True, "llamacpp")  # llama.cpp: the GGUF file's own types
        engines = compare_results(output / "results-llamacpp.json", output / "results-fused.json")
        write_json(engines.to_dict(), output / "compare-engines.json")
        result.identical = result.identical and engines.ok
        same = sum(p.status == "match" for p in engines.prompts)
        detail += f"; llama.cpp (TQ2_0) vs transformers: {same}/{len(engines.prompts)} token-identical"
    return detail


def _evaluate(run: _Run) -> str:
    held_out = run.output / "held-out.txt"
    held_out.write_text("".join(" ".join(str(n) for n in range(start, start + length)) + "\n"
                                for start in HELD_OUT_STARTS for length in (8, 12, 16, 20)))
    models = [run.base, run.sft / "final", run.fused, run.packed]
    if run.llama_cpp_ready():
        models.append(run.gguf_file)
    plan = plan_eval(models, held_out, reference=run.sft / "final", context=64, stride=32, device="cpu")
    report = run.result.evaluation = run_eval(plan)
    write_json(report, run.output / "eval.json")
    worst = max(m["vs_reference"]["mean_kld"] for m in report["models"][1:] if m["format"] != "float")
    return (f"{report['data']['scored_tokens']} held-out tokens; conversions vs the QAT checkpoint: "
            f"mean KLD <= {worst:.4f}")


STAGES: tuple[tuple[str, Callable[[_Run], str]], ...] = (
    ("build tiny model", _build),
    ("train (ternary QAT)", _pretrain),
    ("sft (chat)", _fine_tune),
    ("convert", _convert),
    ("infer (QAT and fused)", _infer),
    ("compare", _compare),
    ("eval (held-out text)", _evaluate),
)


def _pipeline(output: Path, result: QuickstartResult, on_stage: StageFn, on_event: EventFn | None = None) -> None:
    run = _Run(output, result, on_event)
    # no progress bars, and warnings off as `train` turns them off from the second stage on (the first logs none);
    # transformers' settings are as they were once the pipeline ends
    with quiet_transformers(verbosity_error=True):
        for name, work in STAGES:
            _stage(run, on_stage, name, work)
        plot_losses(run.pretrain / METRICS_FILE, output / "loss.png",
                    {"pre-training (ternary QAT)": run.pretrain / METRICS_FILE, "SFT": run.sft / METRICS_FILE})
        (output / "SUMMARY.md").write_text(summary_markdown(result))
    if not result.correct or not result.identical:
        raise CheckFailed("the quickstart ran, but " + ("some held-out prompts were answered wrongly"
                                                        if not result.correct else
                                                        "the QAT checkpoint and the fused model disagree"),
                          hint=f"see {output / 'SUMMARY.md'}")


def summary_markdown(result: QuickstartResult) -> str:
    lines = ["# bitcpm quickstart", "", "The whole toolchain on a tiny BitCPM-shaped model, on the CPU.", "",
             "| stage | time | result |", "| --- | --- | --- |"]
    lines += [f"| {name} | {seconds:.1f} s | {detail} |" for name, seconds, detail in result.stages]
    lines += ["", "## Losses", "", "| run | first | last |", "| --- | --- | --- |"]
    lines += [f"| {name} | {first:.3f} | {last:.3f} |" for name, (first, last) in result.losses.items()]
    lines += ["", "![loss curves](loss.png)", "", "## Held-out prompts (greedy)", "",
              "| model | prompt | expected | generated | correct |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {g['model']} | `{g['prompt']}` | `{g['expected']}` | `{g['generated']}` | "
              f"{'yes' if g['correct'] else 'NO'} |" for g in result.generations]
    lines += ["", f"Cross checks: {'token-identical' if result.identical else 'DIFFERENT'} "
              "(QAT checkpoint vs its fused conversion: `compare.json`; llama.cpp vs transformers, when the `gguf` "
              "extra is installed: `compare-engines.json`).", "", "## Sizes of the weights", "",
              "| format | bytes |", "| --- | --- |"]
    lines += [f"| {name} | {size:,} |" for name, size in result.sizes.items()]
    if result.evaluation is not None:
        lines += ["", "## What each step cost (`bitcpm eval` on held-out text)", ""]
        lines += markdown_table(result.evaluation)
        lines += ["", "The fine-tuned model learned to answer with three numbers and stop, so long counting lines have a "
                  "high perplexity under it; the KLD and same-top columns show what each conversion cost against it."]
    lines += ["", "## What was produced", "",
              "- `base/`: the tiny model, random weights, with the quickstart tokenizer",
              "- `pretrain/`: `bitcpm train` run (metrics.jsonl, checkpoints, final/ QAT checkpoint, loss.png)",
              "- `sft/`: `bitcpm sft` run on chat data (final/ with the chat template)",
              "- `fused/`: `bitcpm convert` output (bf16, loads in stock transformers)",
              "- `packed/`: `bitcpm convert --format packed` output (2-bit codes + scales)",
              "- `model-tq2_0.gguf`: `bitcpm convert --format gguf` output for llama.cpp (with the `gguf` extra)",
              "- `results-pretrain.json`, `results-qat.json`, `results-fused.json`: `bitcpm infer` results; "
              "`compare.json`: `bitcpm compare` of the last two",
              "- `held-out.txt`, `eval.json`: held-out counting text and `bitcpm eval`'s report on it",
              "- `loss.png`: the loss curves", ""]
    lines += [f"- note: {note}" for note in result.notes]
    return "\n".join(lines) + "\n"
