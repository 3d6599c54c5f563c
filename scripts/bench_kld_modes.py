"""How close each training mode gets to its float teacher at the quickstart's tiny shape, in one run: `bitcpm eval`'s
KL divergence (and same-top-token %) of the fused ternary model to the float teacher, after the same number of steps.

1. The teacher: the quickstart's tiny model trained in full precision (`quant_type none`, the quickstart's recipe).
2. From the teacher, for --steps steps each (same data, lr, seed, ternary with groups of 256):
   absmean fusing (no training: `convert --quant-type ternary` of the teacher), trainable_keys [quant_alpha, norm] with
   learned scales, LoRA (r=16, every quantized linear) and full QAT; each without and with the MSE teacher
   (`kd_loss=mse --teacher`, kd_weight 0.5).
3. Each result is converted to a fused checkpoint and scored by one `bitcpm eval` against the teacher on held-out
   counting lines.

    python scripts/bench_kld_modes.py [--steps 60] [--lr 1e-3] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "configs" / "quickstart"
MODES = {
    "trainable_keys + learned scales": ["trainable_keys=[quant_alpha,norm]", "learned_scales=true"],
    "LoRA r=16": ["finetuning_type=lora", "lora_rank=16", "lora_target=all"],
    "full QAT": [],
}


def bitcpm(*args: str) -> str:
    script = Path(sys.executable).with_name("bitcpm")
    done = subprocess.run([str(script) if script.exists() else "bitcpm", *args], capture_output=True, text=True,
                          cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"bitcpm {' '.join(args)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return done.stdout


def build_base(folder: Path) -> None:
    import torch
    import yaml
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    values = yaml.safe_load((ASSETS / "model.yaml").read_text())
    values.pop("model_type", None)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**values)).save_pretrained(folder)
    AutoTokenizer.from_pretrained(ASSETS / "tokenizer").save_pretrained(folder)


def held_out(path: Path) -> None:
    rng = random.Random(7)
    lines = []
    for _ in range(300):
        start = rng.randrange(0, 240)
        lines.append(" ".join(str(n) for n in range(start, start + rng.randint(5, 12))))
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--lr", default="1e-3")
    parser.add_argument("--workdir", type=Path)
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-kld-"))
    base, teacher, data = work / "base", work / "teacher", work / "heldout.txt"
    corpus = str(ASSETS / "corpus.txt")
    if not (teacher / "final").exists():
        build_base(base)
        bitcpm("train", "--config", str(ASSETS / "train.yaml"), "--model", str(base), "--data", corpus,
               "--output-dir", str(teacher), "quant_type=none")
    held_out(data)
    fused = {"absmean fusing (no training)": work / "fused-absmean"}
    shutil.rmtree(fused["absmean fusing (no training)"], ignore_errors=True)
    bitcpm("convert", "--input", str(teacher / "final"), "--output", str(fused["absmean fusing (no training)"]),
           "--quant-type", "ternary", "--group-size", "256")
    common = ["--model", str(teacher / "final"), "--data", corpus, "--max-steps", str(args.steps), "quant_type=ternary",
              "group_size=256", f"lr={args.lr}", "warmup_steps=0", "save_steps=100000", "batch_size=16",
              "block_size=64", "seed=42", "device=cpu"]
    for label, settings in MODES.items():
        for kd in (False, True):
            name = f"{label}{' + MSE teacher' if kd else ''}"
            slug = "".join(c if c.isalnum() else "-" for c in name)
            run, out = work / f"run-{slug}", work / f"fused-{slug}"
            shutil.rmtree(run, ignore_errors=True), shutil.rmtree(out, ignore_errors=True)
            teacher_args = ["kd_loss=mse", f"teacher={teacher / 'final'}", "kd_weight=0.5"] if kd else []
            bitcpm("train", *common, "--output-dir", str(run), *settings, *teacher_args)
            bitcpm("convert", "--input", str(run / "final"), "--output", str(out))
            fused[name] = out
    models = [arg for path in fused.values() for arg in ("--model", str(path))]
    report = json.loads(bitcpm("eval", *models, "--reference", str(teacher / "final"), "--data", str(data),
                               "--context", "64", "--json"))
    by_path = {m["path"]: m for m in report["models"]}
    print(f"steps per run: {args.steps}, lr {args.lr}; KLD to the float teacher on {data.name}")
    print("| mode | mean KLD | same top token % | PPL |")
    print("|---|---|---|---|")
    for label, path in fused.items():
        m = by_path[str(path)]
        versus = m["vs_reference"]
        print(f"| {label} | {versus['mean_kld']:.4f} | {versus['same_top_pct']:.1f} | {m['ppl']:.3f} |")
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
