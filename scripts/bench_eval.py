"""`bitcpm eval`: scored tokens/s per engine, and peak memory against corpus length with BitCPM's vocabulary.

1. Throughput: one mid-size ternary model (a random Llama, ~90M parameters, the quickstart's SentencePiece-style
   tokenizer so that it exports to GGUF), scored on the same ids by transformers in float32 and bfloat16 (the fused
   model) and by llama.cpp (TQ2_0): scored tokens/s of each, and the ratios.
2. Memory: a small model with a 73,448-token vocabulary (BitCPM's) evaluated against itself (reference pass plus a
   compared pass) on 20k and on 100k scored tokens, each in a fresh process; peak RSS of both and their ratio
   (target: the same, i.e. not growing with corpus length).

    python scripts/bench_eval.py [--tokens 2048] [--skip-memory] [--skip-throughput] [--sizes 20000,100000]
"""

from __future__ import annotations

import argparse
import json
import math
import random
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.helpers import BITCPM_1B  # noqa: E402

BITCPM_VOCAB = BITCPM_1B["vocab"]


def build_mid(folder: Path) -> None:
    from safetensors import safe_open

    from tests.helpers import build_tiny_model

    build_tiny_model(folder, kind="qat", group_size=-1, tokenizer=ROOT / "configs" / "quickstart" / "tokenizer",
                     config=dict(vocab_size=512, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                                 num_attention_heads=16, num_key_value_heads=4, head_dim=64,
                                 max_position_embeddings=2048))
    parameters = 0
    for file in folder.glob("*.safetensors"):  # untied, no saved buffers: the model's parameters
        with safe_open(str(file), "pt") as weights:
            for name in weights.keys():
                shape = weights.get_slice(name).get_shape()
                parameters += math.prod(shape)
    print(f"mid-size model: {parameters / 1e6:.0f}M parameters", flush=True)


def throughput(root: Path, tokens: int) -> None:
    from bitcpm_cli.core.conversion.convert import convert_checkpoint
    from bitcpm_cli.core.evaluation.perplexity import plan_eval, run_eval
    from bitcpm_cli.core.conversion.gguf.export import export_gguf

    build_mid(root / "qat")
    convert_checkpoint(root / "qat", root / "fused", dtype="bfloat16")
    export_gguf(root / "qat", root / "m.gguf")
    corpus = (ROOT / "configs" / "quickstart" / "corpus.txt").read_text()
    (root / "corpus.txt").write_text(corpus)
    figures = {}
    for dtype in ("float32", "bfloat16"):
        models = [root / "fused"] + ([root / "m.gguf"] if dtype == "float32" else [])
        report = run_eval(plan_eval(models, root / "corpus.txt", context=512, stride=256, max_tokens=tokens + 1,
                                    device="cpu", dtype=dtype))
        for m in report["models"]:
            label = f"llama.cpp {m['dtype']}" if m["engine"] == "llama.cpp" else f"transformers {dtype}"
            figures[label] = m["tokens_per_s"]
            if "vs_reference" in m:
                print(f"{label} vs transformers float32: mean KLD {m['vs_reference']['mean_kld']:.5f}, "
                      f"same top {m['vs_reference']['same_top_pct']:.2f} %")
    print(f"\nscored tokens/s, {tokens} tokens, context 512, stride 256 (CPU):")
    base = figures["transformers float32"]
    for label, rate in figures.items():
        print(f"  {label:24s} {rate:9.1f} tokens/s  ({rate / base:.2f}x transformers float32)")


def build_big_vocab(folder: Path) -> None:
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    vocab = {t: i for i, t in enumerate(specials + [f"w{i}" for i in range(BITCPM_VOCAB - len(specials))])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                            pad_token="<pad>").save_pretrained(folder)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=BITCPM_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    LlamaForCausalLM(config).save_pretrained(folder)


def memory(root: Path, sizes: list[int]) -> None:
    """Peak RSS of the child's own address space (bench_convert.peak_rss_mb: VmHWM, as ru_maxrss would carry the
    parent's peak over fork+exec)."""
    import os
    import shutil

    build_big_vocab(root / "big")
    shutil.copytree(root / "big", root / "big2")  # the same weights under a second name: KLD exactly 0
    rng = random.Random(0)
    lines = [" ".join(f"w{rng.randrange(BITCPM_VOCAB - 4)}" for _ in range(98)) for _ in range(1100)]
    (root / "words.txt").write_text("\n".join(lines) + "\n")  # 100 tokens a line with BOS and EOS
    peaks = {}
    for scored in sizes:
        child = [sys.executable, "-c", (
            f"import json, sys; sys.path.insert(0, '{ROOT / 'scripts'}'); from bench_convert import peak_rss_mb; "
            "from bitcpm_cli.core.evaluation.perplexity import plan_eval, run_eval; "
            f"r = run_eval(plan_eval(['{root / 'big'}', '{root / 'big'}2'], '{root / 'words.txt'}', "
            f"context=512, stride=256, max_tokens={scored + 1}, device='cpu')); "
            "print(json.dumps({'tokens': r['models'][0]['tokens'], 'kld': r['models'][1]['vs_reference']['mean_kld'],"
            " 'rss_mb': peak_rss_mb()}))")]
        output = subprocess.run(child, check=True, capture_output=True, text=True, cwd=ROOT,
                                env={**os.environ, "PYTHONPATH": str(ROOT)}).stdout
        result = json.loads(output.strip().splitlines()[-1])
        peaks[scored] = result["rss_mb"]
        print(f"  {result['tokens']:7,d} scored tokens, vocab {BITCPM_VOCAB:,}, 2 models: peak RSS "
              f"{peaks[scored]:.0f} MiB (KLD of the model against itself: {result['kld']})", flush=True)
    small, large = min(sizes), max(sizes)
    print(f"  peak RSS {large:,} / {small:,} tokens: {peaks[large] / peaks[small]:.3f}x (target: ~1.0x, not "
          f"{large / small:.0f}x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--sizes", default="20000,100000", help="scored-token counts for the memory check")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if not args.skip_throughput:
            throughput(root, args.tokens)
        if not args.skip_memory:
            print("\npeak memory against corpus length:")
            memory(root, [int(n) for n in args.sizes.split(",")])
    print(f"(this process: peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB)")


if __name__ == "__main__":
    main()
