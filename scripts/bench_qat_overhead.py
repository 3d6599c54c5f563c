"""Training throughput of QAT against full precision, with and without fake-quantized activations, in one run.

The same Llama-shaped model (same initial weights, same random token batches) trains under each variant:
- float: plain nn.Linear everywhere (no fake quantizer);
- ternary A16: ternary weights, groups of 128 (QATLinear, cached fused weights), full-precision activations;
- ternary + int8-token / q8_k / q8_0: the same, every quantized linear's input fake-quantized with that scheme
  (bitcpm_cli.core.quant.activations; the STE backward).
A step is what an optimizer step of `bitcpm train` does: --grad-accum micro-batches of forward + backward (bf16
autocast over fp32 latent weights unless --no-bf16, as the Trainer's bf16), then AdamW's step and zero_grad. Variants
alternate within each repeat (so a drift of the machine hits all of them); a repeat's rate is the median over its
steps after --warmup (one untimed run first warms the allocator); reported: the median and the best over repeats, in
tokens/s, and their ratios to float (on a shared machine the best is the least disturbed).

Shapes: `small` (default; Llama 4 layers x 512, intermediate 1,536, 8 heads, 2 KV heads, vocab 96: a minute on 2
CPU cores) or `1b` (memory_plan.REFERENCE_SHAPES["1b"], the BitCPM4-1B shape; --layers to cut its 28 layers).
Every linear input there is a multiple of 256, so q8_k's blocks fit.

    python scripts/bench_qat_overhead.py [--shape small|1b] [--layers N] [--repeats 3] [--steps 5] [--warmup 1]
        [--batch-size 2] [--block-size 128] [--grad-accum 2] [--variants float,a16,int8-token,q8_k,q8_0] [--no-bf16]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VARIANTS = {"float": None, "a16": "none", "int8-token": "int8-token", "q8_k": "q8_k", "q8_0": "q8_0"}
LABELS = {"float": "float (nn.Linear)", "a16": "ternary A16", "int8-token": "ternary + int8-token",
          "q8_k": "ternary + q8_k", "q8_0": "ternary + q8_0"}
SMALL = dict(vocab=96, hidden=512, layers=4, heads=8, kv_heads=2, head_dim=64, intermediate=1536)


def llama_config(shape: str, layers: int | None):
    """The benchmark model's LlamaConfig: the small shape, or a REFERENCE_SHAPES entry."""
    from transformers import LlamaConfig

    from bitcpm_cli.core.training.memory_plan import REFERENCE_SHAPES

    dims = SMALL if shape == "small" else vars(REFERENCE_SHAPES[shape])
    return LlamaConfig(vocab_size=dims["vocab"], hidden_size=dims["hidden"], intermediate_size=dims["intermediate"],
                       num_hidden_layers=layers or dims["layers"], num_attention_heads=dims["heads"],
                       num_key_value_heads=dims["kv_heads"], head_dim=dims["head_dim"], max_position_embeddings=4096,
                       tie_word_embeddings=False)


def build_model(config, state: dict, activations: str | None):
    """A fresh model with the shared initial weights, prepared for the variant (None: float)."""
    from transformers import LlamaForCausalLM

    from bitcpm_cli.core.quant import QuantScheme, prepare

    model = LlamaForCausalLM(config)
    model.load_state_dict(state)
    if activations is not None:
        prepare(model, QuantScheme(group_size=128, activations=activations))
    return model.train()


def run(variant: str, config, state: dict, batches: list, args) -> dict:
    """Train `args.steps` optimizer steps; the tokens/s of each step after the warm-up."""
    import torch

    model = build_model(config, state, VARIANTS[variant])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    rates = []
    tokens = args.batch_size * args.block_size * args.grad_accum
    for step in range(args.steps):
        started = time.perf_counter()
        for micro in range(args.grad_accum):
            ids = batches[(step * args.grad_accum + micro) % len(batches)]
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= args.warmup:
            rates.append(tokens / (time.perf_counter() - started))
    return {"variant": variant, "tokens_per_s": round(statistics.median(rates), 1), "loss": round(loss.item(), 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=("small", "1b"), default="small")
    parser.add_argument("--layers", type=int, help="decoder layers (default: the shape's)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5, help="optimizer steps per variant and repeat")
    parser.add_argument("--warmup", type=int, default=1, help="steps not counted (the first builds the caches)")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--grad-accum", type=int, default=2)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True,
                        help="bf16 autocast over fp32 latent weights (the Trainer's bf16)")
    args = parser.parse_args()
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or args.steps <= args.warmup:
        parser.error(f"unknown variants {unknown} (choose from {', '.join(VARIANTS)})" if unknown else
                     "--steps must exceed --warmup")

    import torch
    from transformers import LlamaForCausalLM

    config = llama_config(args.shape, args.layers)
    torch.manual_seed(0)
    state = LlamaForCausalLM(config).state_dict()
    generator = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, config.vocab_size, (args.batch_size, args.block_size), generator=generator)
               for _ in range(4)]
    results: dict[str, list[float]] = {v: [] for v in variants}
    run(variants[0], config, state, batches, argparse.Namespace(**{**vars(args), "steps": 2}))  # warm the allocator
    for repeat in range(args.repeats):
        for variant in variants:
            result = run(variant, config, state, batches, args)
            results[variant].append(result["tokens_per_s"])
            print(json.dumps({"repeat": repeat, **result}), file=sys.stderr, flush=True)

    print(f"model: Llama {config.num_hidden_layers} x {config.hidden_size} (intermediate {config.intermediate_size}, "
          f"vocab {config.vocab_size}; shape {args.shape}), batch {args.batch_size} x {args.grad_accum} accumulation "
          f"x {args.block_size} tokens, {'bf16 autocast' if args.bf16 else 'float32'}, AdamW, cpu, "
          f"{torch.get_num_threads()} threads; median of {args.repeats} repeats x {args.steps - args.warmup} steps")
    print("| variant | tokens/s (median) | ratio to float | tokens/s (best) | ratio to float (best) | repeats |")
    print("|---|---|---|---|---|---|")
    base = {"median": statistics.median(results["float"]), "best": max(results["float"])} if "float" in results else {}
    for variant in variants:
        rate, best = statistics.median(results[variant]), max(results[variant])
        ratios = [f"{value / base[key]:.3f}x" if base else "-" for key, value in (("median", rate), ("best", best))]
        print(f"| {LABELS[variant]} | {rate:,.0f} | {ratios[0]} | {best:,.0f} | {ratios[1]} | "
              f"{', '.join(f'{r:,.0f}' for r in results[variant])} |")


if __name__ == "__main__":
    main()
