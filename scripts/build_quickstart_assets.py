"""Generate the quickstart's shipped assets in configs/quickstart/ (deterministic; no download).

- corpus.txt: counting sequences ("57 58 59 60 ..."), the learnable pre-training task;
- chat.jsonl: "continue: 45 46 47" -> "48 49 50" conversations for the SFT step;
- tokenizer/: a SentencePiece-style BPE (Metaspace) trained on those two files with the `tokenizers` library,
  with BOS/EOS/PAD/UNK, <|im_start|> / <|im_end|> and a compact chat template of its own.

    python scripts/build_quickstart_assets.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "configs" / "quickstart"
MAX_NUMBER = 199
VOCAB_SIZE = 512
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]
# Held out from both corpora: the quickstart's generation check asks about these.
HELD_OUT_STARTS = (23, 88, 141)
HELD_OUT_NEXT = (47, 116, 170)
# A compact chat template (the tokenizer's own): the reply follows the question directly, EOS ends it. The tiny
# model then answers with the counting skill pre-training gave it; SFT teaches the format and when to stop.
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}{{ ' ' + m['content'] + '</s>' }}"
    "{% else %}{{ '<|im_start|>' + m['content'] }}{% endif %}"
    "{% endfor %}"
)


def corpus_lines(rng: random.Random, count: int = 3000) -> list[str]:
    lines = []
    while len(lines) < count:
        start, length = rng.randint(0, MAX_NUMBER - 8), rng.randint(6, 16)
        if start in HELD_OUT_STARTS:
            continue
        lines.append(" ".join(str(n) for n in range(start, min(start + length, MAX_NUMBER + 1))))
    return lines


def chat_records(rng: random.Random, count: int = 2000) -> list[dict]:
    records = []
    while len(records) < count:
        n = rng.randint(0, MAX_NUMBER - 6)
        if n in HELD_OUT_NEXT:
            continue
        records.append({"messages": [
            {"role": "user", "content": "continue: " + " ".join(str(k) for k in range(n, n + 3))},
            {"role": "assistant", "content": " ".join(str(k) for k in range(n + 3, n + 6))}]})
    return records


def build_tokenizer(texts: list[str], folder: Path) -> None:
    """A Llama-style (SentencePiece-derived) BPE: Metaspace word boundaries and byte fallback through <0x00>..<0xFF>,
    so llama.cpp's SentencePiece tokenizer reads it from a GGUF file and splits text exactly as transformers does."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Metaspace()
    core.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE - 256, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=list("0123456789abcdefghijklmnopqrstuvwxyz"))
    core.train_from_iterator(texts, trainer)
    # Insert the 256 byte tokens right after the special tokens, as Llama's tokenizer has them, and fall back to them.
    spec = json.loads(core.to_str())
    vocab = spec["model"]["vocab"]
    ordered = sorted(vocab, key=vocab.get)
    ordered = ordered[:len(SPECIALS)] + [f"<0x{b:02X}>" for b in range(256)] + ordered[len(SPECIALS):]
    spec["model"]["vocab"] = {token: i for i, token in enumerate(ordered)}
    spec["model"]["byte_fallback"] = True
    spec["decoder"] = {"type": "Sequence", "decoders": [
        {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "}, {"type": "ByteFallback"},
        {"type": "Fuse"}, {"type": "Strip", "content": " ", "start": 1, "stop": 0}]}
    for added in spec["added_tokens"]:
        added["id"] = spec["model"]["vocab"][added["content"]]
    core = Tokenizer.from_str(json.dumps(spec))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                        pad_token="<pad>", additional_special_tokens=SPECIALS[4:])
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)


def main() -> None:
    rng = random.Random(1234)
    lines = corpus_lines(rng)
    records = chat_records(rng)
    ASSETS.mkdir(parents=True, exist_ok=True)
    (ASSETS / "corpus.txt").write_text("\n".join(lines) + "\n")
    (ASSETS / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    chat_text = [m["content"] for r in records for m in r["messages"]]
    build_tokenizer(lines + chat_text, ASSETS / "tokenizer")
    print(f"wrote {len(lines)} corpus lines, {len(records)} chat examples and a tokenizer to {ASSETS}")


if __name__ == "__main__":
    main()
