"""Training throughput and memory: 1 process against 2 processes under DDP, ZeRO-2, ZeRO-3 and FSDP2, with the
ternary fake quantizer and without it (quant_type none), on the same small model, in one run.

Every run trains the same model on the same data for --steps optimizer steps with --batch-size sequences per process
and micro-batch (so 2 processes see twice the tokens a step). Reported per run: steady tokens/s over all processes
(the median of the logged steps after the first two), the peak RSS of each rank, and the QAT overhead
(none tokens/s / ternary tokens/s - 1). Every process runs one thread (OMP_NUM_THREADS=1), so 2 processes use twice
the cores of 1. CPU runs use gloo and DeepSpeed's CPU accelerator.

    python scripts/bench_distributed.py [--steps 10] [--batch-size 4] [--block-size 128]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

STRATEGIES = {
    "1 process": (1, []),
    "DDP x2": (2, []),
    "ZeRO-2 x2": (2, [f"deepspeed={ROOT / 'configs' / 'deepspeed' / 'zero2.json'}"]),
    "ZeRO-3 x2": (2, [f"deepspeed={ROOT / 'configs' / 'deepspeed' / 'zero3.json'}"]),
    "FSDP2 x2": (2, ["fsdp=full_shard", f"fsdp_config={ROOT / 'configs' / 'fsdp' / 'fsdp2.json'}"]),
}

RANK_SCRIPT = """
import json, os, resource, sys
from transformers import TrainerCallback
from bitcpm_cli.core.training.recipe import TrainConfig, resolve_config
from bitcpm_cli.core.training.train import train

class PeakRss(TrainerCallback):
    def on_train_end(self, args, state, control, **kwargs):
        with open(os.path.join(sys.argv[1], f"rss-{os.environ.get('RANK', '0')}.json"), "w") as handle:
            json.dump(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, handle)

train(resolve_config(TrainConfig, None, {"output_dir": os.path.join(sys.argv[1], "run")}, sys.argv[2:]),
      callbacks=[PeakRss()])
"""


def build(folder: Path, corpus: Path) -> int:
    import random

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.helpers import build_char_tokenizer

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=512,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    build_char_tokenizer(folder)
    rng = random.Random(0)
    corpus.write_text("\n".join(" ".join(str(rng.randint(0, 999)) for _ in range(40)) for _ in range(3000)) + "\n")
    return sum(p.numel() for p in model.parameters())


def run(work: Path, name: str, quant: str, settings: list[str], port: int) -> dict:
    processes, extra = STRATEGIES[name]
    folder = work / f"{name.replace(' ', '_')}-{quant}"
    folder.mkdir()
    script = work / "rank.py"
    script.write_text(RANK_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT)}
    launcher = [sys.executable] if processes == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_port", str(port)]
    done = subprocess.run([*launcher, str(script), str(folder), *settings, f"quant_type={quant}", *extra],
                          capture_output=True, text=True, env=env, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"{name} {quant} failed:\n{done.stderr[-3000:]}")
    records = [json.loads(line) for line in (folder / "run" / "metrics.jsonl").read_text().splitlines()]
    rates = [r["tokens_per_s"] for r in records[2:] if r.get("tokens_per_s")]
    rss = [json.loads((folder / f"rss-{rank}.json").read_text()) for rank in range(processes)]
    return {"tokens_per_s": statistics.median(rates), "peak_rss_mib": [round(r / 2**20) for r in rss]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--block-size", type=int, default=128)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        parameters = build(work / "model", work / "corpus.txt")
        settings = [f"model={work / 'model'}", f"data={work / 'corpus.txt'}", f"max_steps={args.steps}",
                    f"batch_size={args.batch_size}", f"block_size={args.block_size}", "logging_steps=1",
                    f"save_steps={args.steps * 10}", "device=cpu", "lr=1e-3", "group_size=64"]
        results = {}
        for index, name in enumerate(STRATEGIES):
            for quant in ("none", "ternary"):
                results[(name, quant)] = run(work, name, quant, settings, 29700 + 2 * index + (quant == "ternary"))
    base = results[("1 process", "ternary")]["tokens_per_s"]
    print(f"model: Llama, 4 layers x 256 hidden ({parameters / 1e6:.1f} M parameters), {args.steps} steps, batch {args.batch_size} x "
          f"{args.block_size} tokens per process, cpu, {os.cpu_count()} cores")
    print(f"{'strategy':<12} {'ternary tok/s':>14} {'vs 1 proc':>10} {'none tok/s':>11} {'QAT overhead':>13} "
          f"{'peak RSS per rank (ternary)':>28}")  # overhead: how much slower ternary is than quant_type none
    for name in STRATEGIES:
        ternary, none = results[(name, "ternary")], results[(name, "none")]
        print(f"{name:<12} {ternary['tokens_per_s']:>14,.0f} {ternary['tokens_per_s'] / base:>9.2f}x "
              f"{none['tokens_per_s']:>11,.0f} {none['tokens_per_s'] / ternary['tokens_per_s'] - 1:>13.1%} "
              f"{', '.join(f'{m} MiB' for m in ternary['peak_rss_mib']):>28}")


if __name__ == "__main__":
    main()
