"""Training throughput with the ternary fake quantizer against full precision, in one run.

Trains the same Llama-shaped model on the same data with `quant_type none` and `ternary` (bf16 autocast, fp32 latent
weights), alternating several repeats, and compares steady-state tokens/s (the median over logged steps after the
warm-up). Target: ternary >= 0.97x of full precision (the BitCPM-CANN report measured 4.5 % overhead on NPU).

    python scripts/bench_qat_overhead.py [--repeats 3] [--steps 12] [--grad-accum 4] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build(folder: Path, corpus: Path) -> None:
    import random

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.helpers import build_char_tokenizer

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=512, intermediate_size=1536, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=2, head_dim=64, max_position_embeddings=1024,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    LlamaForCausalLM(config).save_pretrained(folder)
    build_char_tokenizer(folder)
    rng = random.Random(0)
    corpus.write_text("\n".join(" ".join(str(rng.randint(0, 999)) for _ in range(40)) for _ in range(4000)) + "\n")


def run(folder: Path, corpus: Path, output: Path, quant_type: str, args) -> float:
    from bitcpm_cli.core.training.recipe import TrainConfig, resolve_config
    from bitcpm_cli.core.training.train import train

    config = resolve_config(TrainConfig, None, {
        "model": str(folder), "data": [str(corpus)], "output_dir": str(output), "quant_type": quant_type,
        "group_size": 128, "max_steps": args.steps, "batch_size": 4, "grad_accum": args.grad_accum,
        "block_size": 256, "logging_steps": 1, "save_steps": 10**6, "bf16": True, "device": args.device,
        "lr": 1e-4})
    train(config)
    rates = [json.loads(line)["tokens_per_s"] for line in (output / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(rates[3:])  # skip the warm-up steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--grad-accum", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    results = {"none": [], "ternary": []}
    with tempfile.TemporaryDirectory() as tmp:
        folder, corpus = Path(tmp) / "model", Path(tmp) / "corpus.txt"
        build(folder, corpus)
        for repeat in range(args.repeats):
            for quant_type in ("none", "ternary"):
                results[quant_type].append(run(folder, corpus, Path(tmp) / f"{quant_type}-{repeat}", quant_type, args))
    float_rate, ternary_rate = statistics.median(results["none"]), statistics.median(results["ternary"])
    print(f"model: Llama 4 x 512 (intermediate 1536), batch 4 x {args.grad_accum} accumulation x 256 tokens, bf16, "
          f"{args.device}")
    print(f"full precision: {float_rate:10,.0f} tokens/s  (repeats: {', '.join(f'{r:,.0f}' for r in results['none'])})")
    print(f"ternary QAT:    {ternary_rate:10,.0f} tokens/s  (repeats: {', '.join(f'{r:,.0f}' for r in results['ternary'])})")
    print(f"ratio ternary / full precision: {ternary_rate / float_rate:.3f}x (target >= 0.97x)")


if __name__ == "__main__":
    main()
