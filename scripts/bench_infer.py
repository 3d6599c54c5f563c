"""`bitcpm infer`'s generation path against plain `model.generate` for the same work, in one run.

Same model (a small random Llama, fused ternary, bf16, CPU), same prompts, greedy, same max_new_tokens; the bitcpm
path includes what the command does per token (the streaming callback that decodes text for the terminal).
Prints tokens/s of each (best of several alternating rounds) and the ratio (target >= 0.95x).

    python scripts/bench_infer.py [--rounds 5] [--new-tokens 64]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROMPTS = ["Hello, how are you?", "The capital of France is", "Explain ternary quantization in one sentence.",
           "Once upon a time"]


def build(folder: Path) -> None:
    from tests.helpers import build_tiny_model

    build_tiny_model(folder, kind="fused", group_size=128, dtype="bfloat16",
                     config=dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                                 num_key_value_heads=2, head_dim=64, max_position_embeddings=512))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()

    import torch
    from transformers import GenerationConfig

    from bitcpm_cli.core.engines.base import Prompt
    from bitcpm_cli.core.engines.hf import load_for_inference, run_generation

    with tempfile.TemporaryDirectory() as tmp:
        build(Path(tmp))
        loaded = load_for_inference(tmp, device="cpu", dtype="bfloat16")
    model, tokenizer = loaded.model, loaded.tokenizer
    prompts = [Prompt(i, text=p) for i, p in enumerate(PROMPTS)]
    config = GenerationConfig(max_new_tokens=args.new_tokens, do_sample=False, eos_token_id=2, pad_token_id=3)

    def plain() -> tuple[int, float]:
        tokens, elapsed = 0, 0.0
        for text in PROMPTS:
            inputs = tokenizer(text, return_tensors="pt")
            start = time.perf_counter()
            with torch.inference_mode():
                out = model.generate(**inputs, generation_config=config)
            elapsed += time.perf_counter() - start
            tokens += out.shape[1] - inputs["input_ids"].shape[1]
        return tokens, elapsed

    def bitcpm() -> tuple[int, float]:
        start = time.perf_counter()
        doc = run_generation(loaded, prompts, max_new_tokens=args.new_tokens, on_text=lambda pid, text: None)
        return doc["summary"]["total_tokens"], time.perf_counter() - start

    plain(), bitcpm()  # warm-up
    best = {"plain": 0.0, "bitcpm": 0.0}
    counts = {}
    for _ in range(args.rounds):
        for name, fn in (("plain", plain), ("bitcpm", bitcpm)):
            tokens, elapsed = fn()
            counts[name] = tokens
            best[name] = max(best[name], tokens / elapsed)
    assert counts["plain"] == counts["bitcpm"], f"different work: {counts}"
    print(f"model: Llama 8 x 512 (fused ternary, bf16), {len(PROMPTS)} prompts x {args.new_tokens} new tokens, CPU, "
          f"torch threads {torch.get_num_threads()}")
    print(f"plain model.generate: {best['plain']:8.1f} tokens/s (best of {args.rounds})")
    print(f"bitcpm infer path:    {best['bitcpm']:8.1f} tokens/s (best of {args.rounds}, whole run incl. streaming)")
    print(f"ratio bitcpm / plain: {best['bitcpm'] / best['plain']:.3f}x (target >= 0.95x)")


if __name__ == "__main__":
    main()
