"""Training with less memory at a real shape, in one run: peak RSS and seconds per optimizer step of the light
training modes on a BitCPM4-1B-shaped bf16 checkpoint, next to full training's memory plan (which refuses it).

Every mode runs `bitcpm train` (the installed script, in a child process) on the same checkpoint and data: block size
512, micro-batch 1, no gradient accumulation, --steps optimizer steps, bf16 autocast, a checkpoint saved only as
final/. Reported per mode: the exit code, the memory plan's total per rank, the child's peak RSS (wait4's ru_maxrss,
the whole run: loading, training and writing final/; the checkpoint is built in another child, so this process stays
small: a child's ru_maxrss starts from its parent's RSS at fork) and the seconds per optimizer step (from metrics.jsonl: the
first step, which also builds the graph, and the median of the others). Goal: each light mode under 12 GiB.

Modes: full (every latent weight trains: the plan refuses it on a 24 GiB machine, with its estimate), trainable_keys
[quant_alpha, norm] with learned scales (the CANN Kit's KD setting, without its teacher), LLaMA-Factory's freeze of
the last 2 decoder layers, LoRA r=16 on every
quantized linear, and LoRA r=16 with an MSE teacher (the same checkpoint, unquantized, in bf16), also with gradient
checkpointing.

The checkpoint: vocab 73,448, hidden 2,048, 28 layers, 16 heads, 2 KV heads, intermediate 6,144, bf16 latent weights
(random, std 0.02), ternary with groups of 128; the quickstart tokenizer.

    python scripts/bench_memory_light.py [--shape 1b] [--layers 28] [--steps 3] [--modes full,keys,freeze,lora,lora-mse,lora-mse-gc]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

GIB = 2**30
MODES = {
    "full": [],
    "keys": ["trainable_keys=[quant_alpha,norm]", "learned_scales=true"],
    "freeze": ["finetuning_type=freeze", "freeze_trainable_layers=2"],
    "lora": ["finetuning_type=lora", "lora_rank=16", "lora_target=all"],
    "lora-mse": ["finetuning_type=lora", "lora_rank=16", "lora_target=all", "kd_loss=mse", "teacher={teacher}"],
    "lora-mse-gc": ["finetuning_type=lora", "lora_rank=16", "lora_target=all", "kd_loss=mse", "teacher={teacher}",
                    "gradient_checkpointing=true"],
}
LABELS = {"full": "full (every latent weight)", "keys": "trainable_keys [quant_alpha, norm] + learned scales",
          "freeze": "freeze: the last 2 decoder layers",
          "lora": "LoRA r=16, every quantized linear", "lora-mse": "LoRA r=16 + MSE teacher (bf16)",
          "lora-mse-gc": "LoRA r=16 + MSE teacher + gradient checkpointing"}


def bitcpm() -> str:
    script = Path(sys.executable).with_name("bitcpm")
    return str(script) if script.exists() else shutil.which("bitcpm") or "bitcpm"


def run_mode(mode: str, model: Path, corpus: Path, output: Path, args) -> dict:
    settings = [s.format(teacher=float_teacher(model)) for s in MODES[mode]]
    command = [bitcpm(), "train", "--model", str(model), "--data", str(corpus), "--output-dir", str(output),
               "--max-steps", str(args.steps), "block_size=512", "batch_size=1", "grad_accum=1", "bf16=true",
               "logging_steps=1", "save_steps=100000", "lr=1e-4", "device=cpu", *settings]
    started = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        child = subprocess.Popen(command, stdout=out, stderr=err, text=True, cwd=ROOT)
        training_peak, metrics = 0, output / "metrics.jsonl"
        while True:  # wait4 gives the rusage of this child alone (its peak RSS); meanwhile sample its RSS
            pid, status, usage = os.wait4(child.pid, os.WNOHANG)
            if pid:
                break
            logged = len(metrics.read_text().splitlines()) if metrics.exists() else 0
            if logged < args.steps:  # until the last step is logged: loading and training, not writing final/
                training_peak = max(training_peak, rss_bytes(child.pid))
            time.sleep(0.2)
        child.returncode = code = os.waitstatus_to_exitcode(status)
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
    wall = time.perf_counter() - started
    result = {"mode": mode, "exit": code, "wall_s": round(wall, 1), "plan_gib": plan_total(stdout + stderr),
              "peak_rss_gib": round(usage.ru_maxrss * 1024 / GIB, 2),
              "training_peak_rss_gib": round(training_peak / GIB, 2)}
    if code != 0:
        result["error"] = " ".join(line for line in stderr.splitlines() if line.startswith(("error:", "hint:")))
        return result
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines() if line]
    tokens_per_step = 512
    seconds = [tokens_per_step / r["tokens_per_s"] for r in records if r.get("tokens_per_s")]
    result["first_step_s"] = round(seconds[0], 1) if seconds else None
    result["step_s"] = round(statistics.median(seconds[1:]), 1) if len(seconds) > 1 else None
    result["losses"] = [round(r["loss"], 4) for r in records]
    return result


def float_teacher(model: Path) -> Path:
    """The same weights as a float model (config.json without bitcpm_quant, the weight files hard-linked: a symlink
    out of the folder is refused as a path escaping it): the teacher."""
    teacher = model.with_name("teacher")
    if not teacher.exists():
        teacher.mkdir()
        for file in model.iterdir():
            if file.name != "config.json":
                os.link(file, teacher / file.name)
        config = json.loads((model / "config.json").read_text())
        config.pop("bitcpm_quant", None)
        (teacher / "config.json").write_text(json.dumps(config, indent=2))
    return teacher


def rss_bytes(pid: int) -> int:
    """A process's resident set size now (0 once it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def plan_total(text: str) -> float | None:
    """The memory plan's `total per rank: X GiB` (printed with the plan), or `needs X GiB` of a refusal."""
    import re

    found = re.search(r"total per rank: ([0-9.]+) GiB", text) or re.search(r"needs ([0-9.]+) GiB per rank", text)
    return float(found.group(1)) if found else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=("1b",), default="1b")
    parser.add_argument("--layers", type=int, help="decoder layers (default: the shape's)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--workdir", type=Path, help="keep the checkpoint and runs here (default: a temporary folder)")
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-light-"))
    model, corpus = work / "model", work / "corpus.txt"
    if not (model / "config.json").exists():
        # in a child: a run's peak RSS (wait4) starts at its parent's RSS at fork, so the parent stays small
        build = (f"import sys; sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / 'scripts')!r}]; "
                 "from bench_convert import build_checkpoint, shape; "
                 f"build_checkpoint(__import__('pathlib').Path({str(model)!r}), shape({args.shape!r}, {args.layers!r}),"
                 " group_size=128)")
        subprocess.run([sys.executable, "-c", build], check=True, cwd=ROOT)
        shutil.copytree(ROOT / "configs" / "quickstart" / "tokenizer", model, dirs_exist_ok=True)
    lines = (ROOT / "configs" / "quickstart" / "corpus.txt").read_text().splitlines()
    corpus.write_text("\n".join(lines * 2) + "\n")
    results = []
    for mode in args.modes.split(","):
        output = work / f"run-{mode}"
        shutil.rmtree(output, ignore_errors=True)
        results.append(run_mode(mode, model, corpus, output, args))
        print(json.dumps(results[-1]), file=sys.stderr, flush=True)
        shutil.rmtree(output, ignore_errors=True)
    print("| mode | exit | plan per rank (GiB) | peak RSS: training / whole run (GiB) | s / step (first, then median) |")
    print("|---|---|---|---|---|")
    for r in results:
        steps = f"{r.get('first_step_s')}, {r.get('step_s')}" if r["exit"] == 0 else r.get("error", "")[:160]
        print(f"| {LABELS[r['mode']]} | {r['exit']} | {r['plan_gib']} | {r['training_peak_rss_gib']} / "
              f"{r['peak_rss_gib']} | {steps} |")
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
