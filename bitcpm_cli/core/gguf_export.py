"""GGUF export with ternary blocks (llama.cpp TQ2_0 / TQ1_0), exact or refused, written with gguf-py.

TQ blocks hold 256 values of one row with one fp16 scale `d = max|x|` and codes round(x / d). A fused ternary block
is reproduced exactly when all its non-zero values share one magnitude (the block lies inside one scale group) and
that magnitude is an fp16 number. Every block is checked before anything is written; after writing, the file is read
back with gguf-py and every ternary tensor must dequantize to the fused weights.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bitcpm_cli.core.checkpoint import iter_tensors, read_config, read_tensor_specs, refuse_remote_code
from bitcpm_cli.core.errors import CheckFailed, InputError
from bitcpm_cli.core.quant import QuantScheme, plan_state_dict

BLOCK = 256
GGUF_TYPES = ("tq2_0", "tq1_0")
EMBEDDING_TYPES = ("f16", "q8_0")


@dataclass
class GgufResult:
    output: str
    gguf_type: str
    tensors: int
    ternary_tensors: int
    bytes_out: int
    seconds: float
    max_abs_error: float = 0.0  # over the ternary tensors, after reading the file back
    exact: bool = True
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """The row order llama.cpp's llama architecture expects for q_proj / k_proj (rotary halves interleaved)."""
    return (weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def block_problem(name: str, weight: np.ndarray) -> str | None:
    """Why this fused weight cannot be written as exact ternary blocks, or None."""
    rows, columns = weight.shape
    if columns % BLOCK:
        return (f"{name}: rows of {columns} values are not a multiple of {BLOCK}; llama.cpp would fall back to F16 "
                "(keep this layer in full precision or pad the model)")
    magnitudes = np.abs(weight.reshape(rows, columns // BLOCK, BLOCK))
    peak = magnitudes.max(axis=-1, keepdims=True)
    if not np.all((magnitudes == 0) | (magnitudes == peak)):
        return (f"{name}: some 256-value blocks hold more than one scale (the quantization groups are smaller than "
                "256 or do not align with the blocks); use group size -1 or a multiple of 256")
    if not np.array_equal(peak.astype(np.float16).astype(np.float32), peak):
        return f"{name}: its scales are not fp16 numbers (convert from bfloat16 or float16 weights)"
    return None


def _write_tokenizer(writer: Any, source: Path, vocab_size: int, notes: list[str]) -> None:
    """SentencePiece-style (BPE with byte fallback: Llama, BitCPM) as llama.cpp's "llama" tokenizer, byte-level
    BPE (GPT-2 style) as its "gpt2" tokenizer with the merges."""
    import gguf
    from gguf.vocab import BpeVocab, LlamaHfVocab, SpecialVocab

    # gguf's LlamaHfVocab loads the tokenizer without trust_remote_code, which could prompt for custom code
    refuse_remote_code(source, hint="GGUF export never runs a folder's own code: export a folder whose tokenizer "
                                    "is a standard tokenizer.json (no auto_map)")
    try:
        vocab, model, pre, merges = LlamaHfVocab(source), "llama", "default", False
    except (FileNotFoundError, TypeError):
        try:
            vocab, model, pre, merges = BpeVocab(source), "gpt2", "gpt-2", True
        except (FileNotFoundError, ValueError) as exc:
            raise InputError(f"cannot export the tokenizer of {source} ({exc})",
                             hint="GGUF export supports tokenizer.json with a SentencePiece-style BPE (byte "
                                  "fallback, like Llama and BitCPM) or a byte-level BPE (GPT-2 style)") from None
    tokens, scores, types = [], [], []
    for text, score, kind in vocab.all_tokens():
        tokens.append(text)
        scores.append(score)
        types.append(kind)
    if len(tokens) > vocab_size:
        raise InputError(f"the tokenizer has {len(tokens)} tokens but the embeddings only {vocab_size} rows",
                         hint="resize the model's embeddings to the tokenizer")
    padded = vocab_size - len(tokens)
    for index in range(len(tokens), vocab_size):  # embedding rows no token uses
        tokens.append(f"[PAD{index}]".encode())
        scores.append(-1000.0)
        types.append(gguf.TokenType.UNUSED)
    if padded:
        notes.append(f"{padded} unused embedding rows written as [PAD] tokens")
    writer.add_tokenizer_model(model)
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    if model == "llama":
        writer.add_token_scores(scores)
    writer.add_token_types(types)
    special = SpecialVocab(source, load_merges=merges, n_vocab=len(tokens))
    # llama.cpp adds BOS / EOS to a prompt exactly when transformers' tokenizer does
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(source, trust_remote_code=False)
    probe = hf("0")["input_ids"]
    special.add_special_token["bos"] = bool(probe) and probe[0] == hf.bos_token_id
    special.add_special_token["eos"] = bool(probe) and probe[-1] == hf.eos_token_id
    special.add_to_gguf(writer)


def _metadata(writer: Any, config: dict[str, Any], gguf_type: str, notes: list[str]) -> tuple[int, int]:
    import gguf

    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads", heads)
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    writer.add_context_length(config.get("max_position_embeddings", 2048))
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(config.get("rms_norm_eps", 1e-6))
    rope = config.get("rope_parameters") or {}
    writer.add_rope_freq_base(float(config.get("rope_theta", rope.get("rope_theta", 10000.0))))
    writer.add_vocab_size(config["vocab_size"])
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_TQ2_0 if gguf_type == "tq2_0" else gguf.LlamaFileType.MOSTLY_TQ1_0)
    scaling = config.get("rope_scaling") or (rope if rope.get("rope_type") not in (None, "default") else None)
    if scaling:
        notes.append(f"RoPE scaling {scaling.get('rope_type', scaling.get('type'))!r} is not exported (llama.cpp's "
                     "llama architecture has no LongRoPE factors): contexts beyond the original length will differ")
    return heads, kv_heads


def export_gguf(source: str | Path, output: str | Path, *, gguf_type: str = "tq2_0", embeddings: str = "f16",
                allow_lossy: bool = False, overwrite: bool = False, **fuse_options: Any) -> GgufResult:
    """A QAT, fused or packed model folder -> one GGUF file with ternary decoder linears."""
    import gguf

    from bitcpm_cli.core.convert import convert_checkpoint
    from bitcpm_cli.core.outputs import OutputGuard

    started = time.perf_counter()
    source, output = Path(source), Path(output)
    if gguf_type not in GGUF_TYPES:
        raise InputError(f"--gguf-type {gguf_type!r} is not one of {', '.join(GGUF_TYPES)}", hint="tq2_0 is the "
                                                                                                  "faster on CPUs")
    if embeddings not in EMBEDDING_TYPES:
        raise InputError(f"embedding type {embeddings!r} is not one of {', '.join(EMBEDDING_TYPES)}", hint="f16")
    if not source.is_dir():
        raise InputError(f"GGUF export needs a model folder with config.json and the tokenizer ({source})",
                         hint="pass the QAT, fused or packed model folder")
    if output.suffix != ".gguf":
        raise InputError(f"--output must name a .gguf file ({output})", hint="e.g. --output model-tq2_0.gguf")
    guard = OutputGuard(output, [source, fuse_options.get("scheme_file")], overwrite=overwrite, kind="file")
    config = read_config(source)
    if config.get("model_type") not in ("llama", "minicpm", "mistral", None):
        raise InputError(f"GGUF export writes the llama architecture; model_type {config.get('model_type')!r} is not "
                         "supported", hint="export Llama/MiniCPM-style decoders")
    qtype = gguf.GGMLQuantizationType.TQ2_0 if gguf_type == "tq2_0" else gguf.GGMLQuantizationType.TQ1_0
    notes: list[str] = []
    staging = guard.claim()  # .bitcpm-tmp-<pid>-<name>; the scratch folder beside it carries the pid too
    with guard.scratch() as scratch:
        fused_file = Path(scratch) / "fused.safetensors"
        fused = convert_checkpoint(source, fused_file, dtype="bfloat16", **fuse_options)
        notes += fused.notes
        files, specs = read_tensor_specs(fused_file)
        scheme = QuantScheme.from_config(config) or QuantScheme(group_size=-1)
        ternary = set(plan_state_dict({n: s.shape for n, s in specs.items()}, {n: s.dtype for n, s in specs.items()},
                                      QuantScheme("ternary", -1, scheme.modules_to_not_convert)))
        names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config["num_hidden_layers"])
        writer = gguf.GGUFWriter(str(staging), "llama")
        try:
            writer.add_name(config.get("_name_or_path") or source.name)
            heads, kv_heads = _metadata(writer, config, gguf_type, notes)
            _write_tokenizer(writer, source, config["vocab_size"], notes)
            problems, expected = [], {}
            for name, tensor in iter_tensors(files):
                gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
                if gguf_name is None:
                    raise InputError(f"no GGUF name for tensor {name}", hint="export Llama/MiniCPM-style decoders")
                data = tensor.to(torch.float32).numpy()
                if name.endswith("q_proj.weight"):
                    data = _permute(data, heads)
                elif name.endswith("k_proj.weight"):
                    data = _permute(data, kv_heads)
                if name in ternary:
                    problem = block_problem(name, data)
                    if problem:
                        problems.append(problem)
                        if not allow_lossy:
                            continue
                    writer.add_tensor(gguf_name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
                    expected[gguf_name] = data
                elif data.ndim == 1:
                    writer.add_tensor(gguf_name, data)
                elif embeddings == "q8_0":
                    writer.add_tensor(gguf_name, gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0),
                                      raw_dtype=gguf.GGMLQuantizationType.Q8_0)
                else:
                    writer.add_tensor(gguf_name, data.astype(np.float16))
            if problems and not allow_lossy:
                raise CheckFailed(f"cannot export exact {gguf_type.upper()} blocks: " + problems[0],
                                  hint="re-fuse with group size -1 or a multiple of 256, or pass --allow-lossy to "
                                       "export anyway and measure the error",
                                  problems=problems if len(problems) > 1 else ())
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
            writer.close()
            error = _read_back(staging, expected)
            if error > 0 and not allow_lossy:
                raise CheckFailed(f"the written GGUF does not reproduce the fused weights (max error {error:g})",
                                  hint="report this as a bug; nothing was written")
            guard.commit()
        except BaseException as exc:
            writer.close()
            guard.abort(exc)
            raise
    result = GgufResult(str(output), gguf_type, len(specs), len(expected), output.stat().st_size,
                        time.perf_counter() - started, error, error == 0 and not problems, notes, fused.warnings)
    if problems:
        result.warnings.append(f"--allow-lossy: {len(problems)} tensor(s) are not exact; max abs error {error:g}")
    return result


def _read_back(path: Path, expected: dict[str, np.ndarray]) -> float:
    """Largest |dequantized - fused| over the ternary tensors of the written file."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    worst = 0.0
    for tensor in reader.tensors:
        if tensor.name in expected:
            values = gguf.quants.dequantize(np.asarray(tensor.data), tensor.tensor_type)
            values = values.reshape(expected[tensor.name].shape)
            worst = max(worst, float(np.abs(values - expected[tensor.name]).max()))
    return worst


def file_fingerprint(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(2**24), b""):
            digest.update(block)
    return f"sha256:{digest.hexdigest()}"
