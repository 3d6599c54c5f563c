"""CPU decode speed of one ternary model: transformers (fused, bf16) against llama.cpp (GGUF TQ2_0, TQ1_0, and the
exact Q4_0 encoding of the same latent weights fused with group size 128) and vLLM (the same fused bf16 folder, in
the vLLM environment: `--vllm-python`), and bitcpm's llama.cpp engine against raw llama-cpp-python on the same TQ2_0
file. vLLM's import and engine start-up are reported apart from its decode rate.

Builds a random Llama-shaped QAT model (ternary, per-row scales), fuses it, exports both GGUF types, then greedily
decodes the same number of tokens with each engine on the CPU (best of a few runs). Prints tokens/s, the ratios and
the file sizes. Targets: llama.cpp >= 5x the transformers bf16 decode speed; bitcpm's engine >= 0.95x raw
llama-cpp-python. Needs the gguf extra.

    python scripts/bench_cpu_decode.py [--hidden 1024] [--layers 8] [--tokens 64] [--vllm-python .venv-vllm/bin/python]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build(folder: Path, hidden: int, layers: int) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from bitcpm_cli.core.quant import QuantScheme, prepare

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=hidden, intermediate_size=hidden * 11 // 4 // 256 * 256,
                         num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 256,
                         head_dim=64, max_position_embeddings=1024, tie_word_embeddings=False, bos_token_id=1,
                         eos_token_id=2, pad_token_id=3)
    model = LlamaForCausalLM(config)
    prepare(model, QuantScheme(group_size=-1))
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(ROOT / "configs" / "quickstart" / "tokenizer").save_pretrained(folder)


def hf_rate(folder: Path, prompt: list[int], tokens: int, repeats: int) -> float:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    ids = torch.tensor([prompt])
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=3)
        best = max(best, (out.shape[1] - ids.shape[1]) / (time.perf_counter() - start))
    return best


def llama_rate(path: Path, prompt: list[int], tokens: int, repeats: int) -> float:
    import llama_cpp
    import numpy as np

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=1024, n_gpu_layers=0, verbose=False)
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        llm.reset()
        llm.eval(prompt)
        for _ in range(tokens):
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))
            llm.eval([int(np.argmax(logits))])
        best = max(best, tokens / (time.perf_counter() - start))
    return best


def vllm_rate(folder: Path, prompt: list[int], tokens: int, repeats: int) -> dict[str, float]:
    """Run in the vLLM environment (`--vllm-only`): vLLM's import, its engine start-up as bitcpm's vllm engine starts
    it (bf16, in-process, the CPU KV cache bitcpm sizes), then the best greedy decode rate of one sequence."""
    began = time.perf_counter()
    from bitcpm_cli.core.engines.vllm import start_llm
    from bitcpm_cli.core.runtime.vllm_platform import current_vllm_platform

    current_platform = current_vllm_platform()
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    imported = time.perf_counter()
    llm = start_llm(folder, "bfloat16", 1024, False, current_platform, [])
    started = time.perf_counter()
    params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True, detokenize=False)
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        out = llm.generate([TokensPrompt(prompt_token_ids=prompt)], params, use_tqdm=False)
        best = max(best, len(out[0].outputs[0].token_ids) / (time.perf_counter() - start))
    return {"import_s": imported - began, "startup_s": started - imported, "tokens_per_s": best}


def measure_vllm(python: str | None, folder: Path, prompt: list[int], tokens: int, repeats: int) -> dict | None:
    """vLLM's figures from a run of this script under the vLLM environment's python (None without one)."""
    if not python:
        return None
    run = subprocess.run([python, __file__, "--vllm-only", str(folder), "--tokens", str(tokens), "--repeats",
                          str(repeats)], capture_output=True, text=True, check=False)
    if run.returncode:
        raise SystemExit(f"the vLLM measurement failed:\n{run.stderr[-3000:]}")
    return json.loads(run.stdout.splitlines()[-1])


def engine_rate(path: Path, tokens: int, repeats: int) -> float:
    """bitcpm's llama.cpp engine (`infer --engine llama.cpp`) on the same file: its own tokens/s, best of a few."""
    from bitcpm_cli.core.engines.base import Prompt
    from bitcpm_cli.core.engines.llamacpp import run_llamacpp

    prompts = [Prompt(id=0, text="23 24 25 26 27")] * repeats
    results = run_llamacpp(path, prompts, max_new_tokens=tokens)["results"]
    return max(r["tokens_per_s"] for r in results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--vllm-python", help="the vLLM environment's python (e.g. .venv-vllm/bin/python): adds the "
                                              "vLLM row")
    parser.add_argument("--vllm-only", type=Path, help=argparse.SUPPRESS)  # internal: measure vLLM on this folder
    args = parser.parse_args()
    prompt = [1, 424, 401, 412, 413, 300, 301, 302]
    if args.vllm_only:
        print(json.dumps(vllm_rate(args.vllm_only, prompt, args.tokens, args.repeats)))
        return

    import torch

    from bitcpm_cli.core.conversion.convert import convert_checkpoint
    from bitcpm_cli.core.conversion.gguf.export import export_gguf

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        build(root / "qat", args.hidden, args.layers)
        convert_checkpoint(root / "qat", root / "fused")
        sizes = {"fused bf16 (safetensors)": (root / "fused" / "model.safetensors").stat().st_size}
        rates = {"transformers bf16": hf_rate(root / "fused", prompt, args.tokens, args.repeats)}
        vllm = measure_vllm(args.vllm_python, root / "fused", prompt, args.tokens, args.repeats)
        if vllm:
            rates["vLLM bf16"] = vllm["tokens_per_s"]
        for kind in ("tq2_0", "tq1_0"):
            path = root / f"model-{kind}.gguf"
            export_gguf(root / "qat", path, gguf_type=kind)
            sizes[f"GGUF {kind.upper()}"] = path.stat().st_size
            rates[f"llama.cpp {kind.upper()}"] = llama_rate(path, prompt, args.tokens, args.repeats)
        shutil.copytree(root / "qat", root / "qat-g128")  # the same latent weights, fused with group size 128
        config = json.loads((root / "qat-g128" / "config.json").read_text())
        config["bitcpm_quant"]["group_size"] = 128
        (root / "qat-g128" / "config.json").write_text(json.dumps(config))
        export_gguf(root / "qat-g128", root / "model-g128.gguf", gguf_type="auto")
        sizes["GGUF auto, group 128 (Q4_0)"] = (root / "model-g128.gguf").stat().st_size
        rates["llama.cpp Q4_0 g128"] = llama_rate(root / "model-g128.gguf", prompt, args.tokens, args.repeats)
        rates["bitcpm engine TQ2_0"] = engine_rate(root / "model-tq2_0.gguf", args.tokens, args.repeats)
    base = rates["transformers bf16"]
    print(f"model: Llama {args.layers} x {args.hidden} (ternary, per-row scales), {args.tokens} greedy tokens, CPU, "
          f"torch threads {torch.get_num_threads()}")
    for name, rate in rates.items():
        print(f"{name:20} {rate:8.1f} tokens/s   ratio vs transformers bf16: {rate / base:.2f}x")
    for name, size in sizes.items():
        print(f"{name:26} {size / 2**20:8.1f} MiB")
    print(f"target: llama.cpp >= 5x transformers bf16 -> TQ2_0 {rates['llama.cpp TQ2_0'] / base:.2f}x, "
          f"TQ1_0 {rates['llama.cpp TQ1_0'] / base:.2f}x, Q4_0 g128 {rates['llama.cpp Q4_0 g128'] / base:.2f}x")
    if vllm:
        print(f"vLLM: import {vllm['import_s']:.1f} s, engine start-up {vllm['startup_s']:.1f} s (not in its rate)")
    else:
        print("vLLM: not measured (pass --vllm-python with the vLLM environment's python)")
    print(f"target: bitcpm's llama.cpp engine >= 0.95x raw llama-cpp-python on the same TQ2_0 file -> "
          f"{rates['bitcpm engine TQ2_0'] / rates['llama.cpp TQ2_0']:.2f}x")


if __name__ == "__main__":
    main()
