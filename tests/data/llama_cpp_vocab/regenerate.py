"""Rebuild this folder from a llama.cpp tree (the one vendored in the llama-cpp-python sdist):

    pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 -d /tmp/sdist
    tar -xzf /tmp/sdist/llama_cpp_python-0.3.36.tar.gz -C /tmp/sdist
    python tests/data/llama_cpp_vocab/regenerate.py /tmp/sdist/llama_cpp_python-0.3.36/vendor/llama.cpp

Copies `models/ggml-vocab-NAME.gguf` (xz-compressed) with its `.inp` / `.out` test vectors for each NAME below, and
writes `pretokenizers.json`: for each BPE pre-tokenizer name those files state (`tokenizer.ggml.pre`), the regexes,
and `ignore_merges` that llama.cpp's `src/llama-vocab.cpp` gives it.
"""

from __future__ import annotations

import json
import lzma
import re
import shutil
import sys
from pathlib import Path

NAMES = ("deepseek-coder", "deepseek-llm", "falcon", "gpt-2", "llama-bpe", "llama-spm", "phi-3", "qwen2", "qwen35",
         "starcoder")
HERE = Path(__file__).resolve().parent


def c_string(literal: str) -> str:
    return re.sub(r'\\(.)', lambda m: {"n": "\n", "r": "\r", "t": "\t"}.get(m.group(1), m.group(1)), literal)


def pretokenizers(source: str, names: set[str]) -> dict[str, dict]:
    """name -> {regexes, ignore_merges} from llama_vocab's loader and llm_tokenizer_bpe's constructor."""
    branches = re.findall(r'if \(((?:\s*tokenizer_pre == "[^"]+"\s*\|*)+)\)\s*\{(.*?)\}', source, re.S)
    settings = {}
    for names_part, body in branches:
        kind = re.search(r"pre_type = (LLAMA_VOCAB_PRE_TYPE_\w+);", body)
        for name in re.findall(r'"([^"]+)"', names_part):
            if kind and name in names:
                settings[name] = (kind.group(1), "ignore_merges = true" in body)
    constructor = source[source.index("struct llm_tokenizer_bpe : llm_tokenizer {"):]
    constructor = constructor[:constructor.index("default:")]
    regexes = {}
    for block in constructor.split("break;"):
        exprs = re.search(r"regex_exprs = \{(.*?)\};", block, re.S)
        if exprs:
            lines = [line for line in exprs.group(1).splitlines() if not line.strip().startswith("//")]
            found = [c_string(s) for s in re.findall(r'"((?:[^"\\]|\\.)*)"', "\n".join(lines))]
            for kind in re.findall(r"case (LLAMA_VOCAB_PRE_TYPE_\w+):", block):
                regexes[kind] = found
    return {name: {"regexes": regexes[kind], "ignore_merges": ignore}
            for name, (kind, ignore) in sorted(settings.items())}


def main(llama_cpp: Path) -> None:
    import gguf

    pres = set()
    for name in NAMES:
        vocab = llama_cpp / "models" / f"ggml-vocab-{name}.gguf"
        (HERE / f"{vocab.name}.xz").write_bytes(lzma.compress(vocab.read_bytes(), preset=9))
        for suffix in (".inp", ".out"):
            shutil.copyfile(f"{vocab}{suffix}", HERE / f"{vocab.name}{suffix}")
        fields = gguf.GGUFReader(str(vocab)).fields
        if bytes(fields["tokenizer.ggml.model"].parts[-1]).decode() == "gpt2":
            pres.add(bytes(fields["tokenizer.ggml.pre"].parts[-1]).decode())
    table = pretokenizers((llama_cpp / "src" / "llama-vocab.cpp").read_text(encoding="utf-8"), pres)
    missing = pres - set(table)
    if missing:
        raise SystemExit(f"no regexes found for {sorted(missing)}")
    (HERE / "pretokenizers.json").write_text(json.dumps(table, indent=1) + "\n", encoding="utf-8")
    shutil.copyfile(llama_cpp / "LICENSE", HERE / "LICENSE")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
