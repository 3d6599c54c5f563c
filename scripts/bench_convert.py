"""Measure `bitcpm convert` on a >= 1.5 GB multi-shard QAT checkpoint, in one run, against two baselines.

- copy: a plain file copy of the same shards (the I/O floor);
- load-everything: load every shard into memory, quantize every linear, save everything (what a naive
  `torch.load + quantize + torch.save` script does).
Each runs in its own process; wall time and peak RSS are printed with the ratios the targets are stated in:
peak RSS <= 0.25x the model size + 400 MB, wall time <= 4x the copy.

    python scripts/bench_convert.py [--layers 14] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

HIDDEN, INTERMEDIATE, VOCAB = 2048, 5632, 32000


def build_checkpoint(folder: Path, layers: int) -> int:
    """A Llama-shaped QAT checkpoint (bf16 latent weights, ternary g128) in 4 safetensors shards."""
    import torch
    from safetensors.torch import save_file

    from tests.helpers import llama_shapes

    folder.mkdir(parents=True)
    shapes = llama_shapes(HIDDEN, layers, 16, 16, 128, INTERMEDIATE, VOCAB)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
              "num_hidden_layers": layers, "num_attention_heads": 16, "num_key_value_heads": 16, "head_dim": 128,
              "intermediate_size": INTERMEDIATE, "vocab_size": VOCAB, "torch_dtype": "bfloat16",
              "tie_word_embeddings": False,
              "bitcpm_quant": {"quant_type": "ternary", "group_size": 128,
                               "modules_to_not_convert": ["lm_head", "embed_tokens"], "layers": {}}}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    names = list(shapes)
    shards = [names[i::4] for i in range(4)]
    weight_map, generator = {}, torch.Generator().manual_seed(0)
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-00004.safetensors"
        tensors = {n: (torch.randn(shapes[n], generator=generator) * 0.02).to(torch.bfloat16) for n in shard}
        save_file(tensors, folder / file, metadata={"format": "pt"})
        weight_map.update({n: file for n in shard})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


# ---- the three contenders, each run in a child process -----------------------------------------------
def child_copy(source: Path, output: Path) -> None:
    shutil.copytree(source, output)


def child_convert(source: Path, output: Path) -> None:
    from bitcpm_cli.core.convert import convert_checkpoint

    convert_checkpoint(source, output)


def child_load_everything(source: Path, output: Path) -> None:
    import torch
    from safetensors.torch import load_file

    from bitcpm_cli.core.quant import QuantScheme, fake_quantize

    scheme = QuantScheme(group_size=128)
    state = {}
    for shard in sorted(source.glob("*.safetensors")):
        state.update(load_file(shard))
    for name, tensor in state.items():
        module = name.removesuffix(".weight")
        if tensor.ndim == 2 and "embed" not in module and scheme.for_module(module).enabled:
            state[name] = fake_quantize(tensor, scheme.for_module(module), dtype=torch.bfloat16)
    output.mkdir()
    torch.save(state, output / "pytorch_model.bin")


CHILDREN = {"copy": child_copy, "convert": child_convert, "load-everything": child_load_everything}


def run_child(kind: str, source: Path, output: Path) -> dict:
    done = subprocess.run([sys.executable, __file__, "--child", kind, str(source), str(output)],
                          capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"{kind} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=14, help="decoder layers (14 gives about 1.7 GB)")
    parser.add_argument("--child", nargs=3, metavar=("KIND", "SOURCE", "OUTPUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, source, output = args.child
        start = time.perf_counter()
        CHILDREN[kind](Path(source), Path(output))
        wall = time.perf_counter() - start
        print(json.dumps({"wall_s": wall, "peak_rss_mb": peak_rss_mb()}))
        return

    with tempfile.TemporaryDirectory(dir=ROOT.parent if ROOT.parent.is_dir() else None) as tmp:
        source = Path(tmp) / "qat"
        size = build_checkpoint(source, args.layers)
        size_mb = size / 2**20
        results = {}
        for kind in ("copy", "convert", "load-everything"):
            results[kind] = run_child(kind, source, Path(tmp) / kind)
            shutil.rmtree(Path(tmp) / kind)
    idle = run_child_idle()
    copy, conv, naive = results["copy"], results["convert"], results["load-everything"]
    budget = 0.25 * size_mb + 400
    print(f"checkpoint: {size_mb:,.0f} MiB in 4 safetensors shards ({args.layers} layers, bf16 latent, ternary g128)")
    print(f"{'':18}{'wall s':>9}{'peak RSS MiB':>15}")
    for kind, r in results.items():
        print(f"{kind:18}{r['wall_s']:9.2f}{r['peak_rss_mb']:15.0f}")
    print(f"(a Python process that imports torch and does nothing peaks at {idle:.0f} MiB)")
    print(f"convert wall / copy wall:            {conv['wall_s'] / copy['wall_s']:.2f}x   (target <= 4x)")
    print(f"convert wall / load-everything wall: {conv['wall_s'] / naive['wall_s']:.2f}x")
    print(f"convert peak RSS / model size:       {conv['peak_rss_mb'] / size_mb:.3f}x  "
          f"({conv['peak_rss_mb']:.0f} MiB vs budget 0.25x + 400 MB = {budget:.0f} MiB: "
          f"{'within' if conv['peak_rss_mb'] <= budget else 'OVER'})")
    print(f"load-everything peak RSS / model size: {naive['peak_rss_mb'] / size_mb:.3f}x")


def peak_rss_mb() -> float:
    """This process's own peak RSS (VmHWM). ru_maxrss would include the parent's RSS at fork time."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_child_idle() -> float:
    code = ("import sys; sys.path.insert(0, 'scripts'); import torch, bitcpm_cli.core.convert; "
            "from bench_convert import peak_rss_mb; print(peak_rss_mb())")
    return float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT).stdout)


if __name__ == "__main__":
    main()
