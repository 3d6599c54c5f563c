"""Builders for test checkpoints: Llama-style tensor shapes, sparse safetensors files, model directories.

Also used by scripts/bench_fix_config.py.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

DTYPE_CODES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


def llama_shapes(hidden: int, layers: int, heads: int, kv_heads: int, head_dim: int, intermediate: int,
                 vocab: int, tied: bool = False) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "self_attn.q_proj.weight": (heads * head_dim, hidden),
            p + "self_attn.k_proj.weight": (kv_heads * head_dim, hidden),
            p + "self_attn.v_proj.weight": (kv_heads * head_dim, hidden),
            p + "self_attn.o_proj.weight": (hidden, heads * head_dim),
            p + "mlp.gate_proj.weight": (intermediate, hidden),
            p + "mlp.up_proj.weight": (intermediate, hidden),
            p + "mlp.down_proj.weight": (hidden, intermediate),
            p + "input_layernorm.weight": (hidden,),
            p + "post_attention_layernorm.weight": (hidden,),
        })
    if not tied:
        shapes["lm_head.weight"] = (vocab, hidden)
    return shapes


# The BitCPM4-CANN-1B weights (adaptation report): 2048 / 28 layers / 16 heads / 2 KV heads / head_dim 128 / 6144.
BITCPM_1B = dict(hidden=2048, layers=28, heads=16, kv_heads=2, head_dim=128, intermediate=6144, vocab=73448)


def bitcpm_1b_published_config() -> dict:
    """The config.json the 1B repository shipped: right vocab, KV heads and head_dim; wrong everything else."""
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2560, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 2, "head_dim": 128, "intermediate_size": 10240,
        "vocab_size": 73448, "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "hidden_act": "silu",
        "rope_theta": 10000.0, "torch_dtype": "bfloat16", "tie_word_embeddings": False, "scale_emb": 12,
        "rope_scaling": {"rope_type": "longrope", "long_factor": [1.0] * 64, "short_factor": [1.0] * 64,
                         "original_max_position_embeddings": 32768},
    }


def write_sparse_safetensors(path: Path, shapes: dict[str, tuple[int, ...]], dtype: str = "bfloat16") -> int:
    """A real safetensors header followed by a hole as long as the data: full-size on paper, empty on disk."""
    header, offset = {}, 0
    for name, shape in shapes.items():
        size = DTYPE_BYTES[dtype]
        for d in shape:
            size *= d
        header[name] = {"dtype": DTYPE_CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * ((-len(raw)) % 8)
    with path.open("wb") as handle:
        handle.write(struct.pack("<Q", len(raw)))
        handle.write(raw)
        handle.truncate(8 + len(raw) + offset)
    return 8 + len(raw) + offset


def write_model_dir(path: Path, config: dict, shapes: dict[str, tuple[int, ...]], fmt: str = "safetensors",
                    shards: int = 1, dtype: str = "bfloat16") -> Path:
    """A model directory with config.json and weights: sparse safetensors, or real (small) tensors in .bin."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    names = list(shapes)
    groups = [names[i::shards] for i in range(shards)]
    ext = "safetensors" if fmt == "safetensors" else "bin"
    stem = "model" if fmt == "safetensors" else "pytorch_model"
    files = [f"{stem}.{ext}"] if shards == 1 else [f"{stem}-{i + 1:05d}-of-{shards:05d}.{ext}" for i in range(shards)]
    for group, file in zip(groups, files):
        subset = {n: shapes[n] for n in group}
        if fmt == "safetensors":
            write_sparse_safetensors(path / file, subset, dtype)
        else:
            import torch

            torch.save({n: torch.zeros(s, dtype=getattr(torch, dtype)) for n, s in subset.items()}, path / file)
    if shards > 1:
        index = {"metadata": {}, "weight_map": {n: f for group, f in zip(groups, files) for n in group}}
        (path / f"{stem}.{ext}.index.json").write_text(json.dumps(index))
    return path


CHARS = [c for c in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,!?;:'\"-+*/=()\n"]


def build_char_tokenizer(folder: Path):
    """A character-level tokenizer (vocab < 96) built locally with `tokenizers`, saved as a fast HF tokenizer."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]
    vocab = {token: i for i, token in enumerate(specials + CHARS)}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                        pad_token="<pad>", additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    tokenizer.save_pretrained(folder)
    return tokenizer


def build_tiny_model(folder: Path, kind: str = "fused", group_size: int = 32, seed: int = 0, tied: bool = False,
                     config: dict | None = None, dtype: str | None = None, tokenizer: str | Path | None = None):
    """A tiny Llama + tokenizer folder: kind 'float' (plain), 'qat' (latent + bitcpm_quant) or 'fused'.

    `config` overrides LlamaConfig settings (sizes); `dtype` (e.g. "bfloat16") casts the weights before saving;
    `tokenizer` is a tokenizer folder to copy in place of the character-level one. Also used by scripts/bench_eval.py
    and scripts/bench_infer.py for larger models."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from bitcpm_cli.core.quant import QuantScheme, fuse, prepare

    torch.manual_seed(seed)
    settings = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=16, max_position_embeddings=256, tie_word_embeddings=tied,
                    bos_token_id=1, eos_token_id=2, pad_token_id=3)
    model = LlamaForCausalLM(LlamaConfig(**{**settings, **(config or {})}))
    if kind in ("qat", "fused"):
        prepare(model, QuantScheme(group_size=group_size))
    if kind == "fused":
        fuse(model)
    if dtype is not None:
        model.to(getattr(torch, dtype))
    model.save_pretrained(folder)
    if tokenizer is None:
        build_char_tokenizer(folder)
    else:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(tokenizer).save_pretrained(folder)
    return folder


def refuse_direct_io_at_open(monkeypatch) -> None:
    """Make os.open fail as a filesystem without direct I/O does: EINVAL for O_DIRECT."""
    import errno
    import os

    real_open = os.open

    def no_direct(path, flags, *args):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", no_direct)


# ---- the installed script, and real small / read-only file systems --------------------------------------------------
def bitcpm_script(*args, cwd=None, env: dict | None = None, unset: tuple[str, ...] = ("BITCPM_DEBUG",),
                  wrap: list[str] | None = None, timeout: int = 600):
    """Run the installed `bitcpm` script (beside this interpreter) in a subprocess, stdin closed. `env` adds
    variables (DS_ACCELERATOR defaults to cpu as CI sets it; pass unset=("DS_ACCELERATOR",) to drop it); `wrap`
    prefixes the command (e.g. a mount namespace from `small_filesystem`)."""
    import os
    import subprocess
    import sys

    script = Path(sys.executable).parent / "bitcpm"
    assert script.is_file(), f"the bitcpm script is not installed beside {sys.executable} (pip install -e .)"
    environment = {**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu"), **(env or {})}
    for name in unset:
        environment.pop(name, None)
    return subprocess.run([*(wrap or []), str(script), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL, cwd=cwd, env=environment)


def bitcpm_in_process(*args, cwd=None):
    """The same command as `bitcpm_script`, run in this process through typer's CliRunner (bitcpm_cli.cli.app.app):
    a subprocess.CompletedProcess with the exit code, stdout and stderr. For the error paths and options whose exit
    code and message one installed-script run of the same command already shows end to end: no 4-6 s of imports per
    run. `cwd` is the working folder for the run (relative paths), restored afterwards."""
    import os
    import subprocess

    from typer.testing import CliRunner

    from bitcpm_cli.cli.app import app

    before = os.getcwd()
    if cwd is not None:
        os.chdir(cwd)
    try:
        result = CliRunner().invoke(app, [str(a) for a in args])
    finally:
        os.chdir(before)
    return subprocess.CompletedProcess(list(args), result.exit_code, result.stdout, result.stderr)


_NAMESPACES: list[bool] = []


def mount_namespaces_work() -> bool:
    """Whether `unshare -rm` can mount a tmpfs here (root, or unprivileged user namespaces allowed)."""
    import shutil
    import subprocess
    import tempfile

    if not _NAMESPACES:
        ok = shutil.which("unshare") is not None
        if ok:
            with tempfile.TemporaryDirectory() as folder:
                probe = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {folder}"],
                                       capture_output=True, stdin=subprocess.DEVNULL)
                ok = probe.returncode == 0
        _NAMESPACES.append(ok)
    return _NAMESPACES[0]


def small_filesystem(mountpoint: Path, size: str = "1m", read_only: bool = False,
                     listing: Path | None = None) -> list[str]:
    """A command prefix that runs its command with a fresh tmpfs of `size` (read-only with `read_only`) mounted on
    `mountpoint`, in a private mount namespace (nothing is mounted for anyone else, nothing to clean up); with
    `listing`, what the tmpfs holds after the command (`ls -A`) is written there. Skips the calling test, with the
    reason, where mount namespaces are not available."""
    import pytest

    if not mount_namespaces_work():
        pytest.skip("needs `unshare -rm` (root or unprivileged user namespaces) to mount a small or read-only tmpfs")
    mountpoint.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (",ro" if read_only else "")
    run = 'exec "$@"' if listing is None else f'"$@"; code=$?; ls -A "{mountpoint}" > "{listing}"; exit $code'
    return ["unshare", "-rm", "sh", "-c", f'mount -t tmpfs -o {options} tmpfs "{mountpoint}" && {run}', "sh"]


def copy_with_chat_template(model: Path, folder: Path, template, where: str = "jinja") -> Path:
    """A copy of `model` whose chat template is `template`: in chat_template.jinja, or (where="config") as
    tokenizer_config.json's chat_template (any JSON value)."""
    import json
    import shutil

    shutil.copytree(model, folder)
    if where == "jinja":
        (folder / "chat_template.jinja").write_text(template)
    else:
        config = json.loads((folder / "tokenizer_config.json").read_text())
        config["chat_template"] = template
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder
