"""Measure `bitcpm convert --format gguf` on a BitCPM4-1B-shaped bf16 QAT checkpoint, in one run, against a plain
copy of the input: wall time and peak RSS, with the target peak RSS <= 0.25x the bf16 model + 400 MB (the export
streams: one tensor is fused, encoded, checked and written at a time, with no temporary fused copy).

The checkpoint: vocab 73,448, hidden 2,048, 28 layers, 16 heads, 2 KV heads, intermediate 6,144, bf16 latent
weights, ternary with per-row scales (exact as TQ2_0); `--group-size 128` makes it a group-wise model (written as
Q4_0 by `--gguf-type auto`). The tokenizer is the quickstart's (the remaining embedding rows become [PAD] tokens).

    python scripts/bench_gguf.py [--layers 28] [--group-size -1] [--gguf-type tq2_0] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_convert import build_checkpoint, print_rounds, rounds, run_child_idle, shape, timed  # noqa: E402


def child_copy(source: Path, output: Path, gguf_type: str) -> None:
    shutil.copytree(source, output)


def child_export(source: Path, output: Path, gguf_type: str) -> None:
    from bitcpm_cli.core.conversion.gguf.export import export_gguf

    result = export_gguf(source, output / "model.gguf", gguf_type=gguf_type)
    print(json.dumps({"types": result.tensor_types, "bits_per_weight": round(result.bits_per_weight, 3),
                      "bytes_out": result.bytes_out}), file=sys.stderr)


CHILDREN = {"copy": child_copy, "gguf export": child_export}


def run_child(kind: str, source: Path, output: Path, gguf_type: str) -> dict:
    done = subprocess.run([sys.executable, __file__, "--child", kind, str(source), str(output), gguf_type],
                          capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"{kind} failed:\n{done.stderr}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    details = [line for line in done.stderr.splitlines() if line.startswith("{")]
    if details:
        result.update(json.loads(details[-1]))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, help="decoder layers (default 28, the 1B's)")
    parser.add_argument("--group-size", type=int, default=-1)
    parser.add_argument("--gguf-type", default="tq2_0")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of both contenders (medians are reported)")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, source, output, gguf_type = args.child
        def work() -> None:
            if kind != "copy":
                Path(output).mkdir()
            CHILDREN[kind](Path(source), Path(output), gguf_type)

        print(json.dumps(timed(work)))
        return

    with tempfile.TemporaryDirectory(dir=ROOT.parent if ROOT.parent.is_dir() else None) as tmp:
        source = Path(tmp) / "qat"
        dims = shape("1b", args.layers)
        size_mb = build_checkpoint(source, dims, group_size=args.group_size) / 2**20
        shutil.copytree(ROOT / "configs" / "quickstart" / "tokenizer", source, dirs_exist_ok=True)
        results = rounds(CHILDREN, args.repeats, lambda kind: run_child(kind, source, Path(tmp) / "out",
                                                                         args.gguf_type), Path(tmp) / "out")
    idle = run_child_idle()
    budget = 0.25 * size_mb + 400
    copy, export = results["copy"], results["gguf export"]
    print(f"checkpoint: {size_mb:,.0f} MiB bf16 in 4 safetensors shards ({dims}, group size {args.group_size})")
    print_rounds(results)
    print(f"(a Python process that imports torch and does nothing peaks at {idle:.0f} MiB)")
    print(f"GGUF: {export['bytes_out'] / 2**20:,.0f} MiB, {export['bits_per_weight']} bits/weight, types "
          f"{export['types']}")
    print(f"export wall / copy wall:       {export['wall_s'] / copy['wall_s']:.2f}x")
    print(f"export peak RSS / model size:  {export['peak_rss_mb'] / size_mb:.3f}x  ({export['peak_rss_mb']:.0f} MiB "
          f"vs budget 0.25x + 400 MB = {budget:.0f} MiB: {'within' if export['peak_rss_mb'] <= budget else 'OVER'})")


if __name__ == "__main__":
    main()
