"""Fuzz GGUF export with hostile tokenizer files (issue #23 item 5): tokenizer.json with mangled structure, vocab
ids, merges and added tokens, tokenizer_config.json / special_tokens_map.json with wrong shapes or unknown special
tokens, a corrupt tokenizer.model, raw bytes.

Invariants (tests.fuzz.test_fuzz_commands.run): exit 0, 1 or 2, never a traceback, nothing written (no staging
left) when it fails, every input byte for byte as before. The model is built once; each example varies only the
tokenizer files of a copy. Bounded: EXAMPLES examples a strategy, no deadline (2-core CI machines)."""

import json
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("gguf", reason="GGUF export needs the gguf extra: pip install -e '.[gguf]'")

from tests.fuzz.test_fuzz_commands import run
from tests.fuzz.test_fuzz_readers import json_values, mangled_json
from tests.helpers import build_tiny_model

EXAMPLES = 30
STRATEGIES = 6  # the @given tests below
BOUNDED = settings(max_examples=EXAMPLES, deadline=None, database=None,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
TOKENIZER = Path(__file__).resolve().parents[2] / "configs" / "quickstart" / "tokenizer"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A tiny fused model (vocab 512, 509 tokens) with the quickstart's SentencePiece-style BPE tokenizer."""
    return build_tiny_model(tmp_path_factory.mktemp("fuzz-tokenizer") / "fused", group_size=-1, tokenizer=TOKENIZER,
                            config={"vocab_size": 512})


def export_variant(model: Path, files: dict[str, bytes | None]) -> None:
    """Export a copy of `model` whose `files` are replaced (None: removed) and check the invariants."""
    with tempfile.TemporaryDirectory() as root:
        folder = Path(root) / "in" / "m"
        shutil.copytree(model, folder)
        for name, raw in files.items():
            (folder / name).unlink(missing_ok=True) if raw is None else (folder / name).write_bytes(raw)
        out = Path(root) / "out" / "m.gguf"
        out.parent.mkdir()
        run("convert", "-i", folder, "-o", out, "--format", "gguf", "--gguf-type", "auto", inputs=Path(root) / "in",
            output=out)


def original(model: Path, name: str = "tokenizer.json") -> dict:
    return json.loads((model / name).read_text())


def dump(value) -> bytes:
    return json.dumps(value).encode()


ids = st.one_of(st.integers(-3, 600), st.sampled_from([0, 5, 508, 509, 510, 511, 512, 2**32, 2**40]),
                st.text(max_size=3), st.booleans(), st.none(), st.floats(allow_nan=False, allow_infinity=False))
token_texts = st.one_of(st.sampled_from(["<s>", "</s>", "<unk>", "a", "b", "ab", "▁", "<0x41>", "<|im_end|>", ""]),
                        st.text(max_size=6))


@st.composite
def merges(draw):
    """A merges list: "a b" strings with any number of spaces, pairs or triples, numbers, unknown tokens, mixed
    formats, or a long list."""
    item = st.one_of(st.lists(token_texts, min_size=0, max_size=3).map(" ".join), st.lists(token_texts, max_size=3),
                     json_values)
    kind = draw(st.sampled_from(["list", "long", "other"]))
    if kind == "long":
        return [[draw(token_texts), f"z{i}"] for i in range(draw(st.integers(1000, 50_000)))]
    return draw(st.lists(item, max_size=6)) if kind == "list" else draw(json_values)


@st.composite
def added_tokens(draw):
    """An added_tokens list whose entries miss fields, have the wrong types or ids around the vocabulary's end."""
    fields = {"id": ids, "content": st.one_of(token_texts, json_values), "single_word": st.one_of(st.booleans(),
              json_values), "lstrip": st.booleans(), "rstrip": st.booleans(), "normalized": st.booleans(),
              "special": st.one_of(st.booleans(), json_values)}
    entry = st.fixed_dictionaries({}, optional=fields)
    return draw(st.one_of(st.lists(st.one_of(entry, json_values), max_size=4), json_values))


@BOUNDED
@given(st.data())
def test_tokenizer_json_with_a_mangled_part(model, data):
    tokenizer = original(model)
    part = data.draw(st.sampled_from(["model", "model.vocab", "model.merges", "model.type", "decoder", "added_tokens",
                                      "pre_tokenizer", "model.byte_fallback", "normalizer", "post_processor"]))
    value = data.draw(json_values)
    *parents, key = part.split(".")
    target = tokenizer
    for name in parents:
        target = target[name]
    if data.draw(st.booleans()):
        target.pop(key, None)
    else:
        target[key] = value
    export_variant(model, {"tokenizer.json": dump(tokenizer)})


@BOUNDED
@given(st.data())
def test_tokenizer_json_with_hostile_vocab_ids(model, data):
    tokenizer = original(model)
    vocab = tokenizer["model"]["vocab"]
    names = data.draw(st.lists(st.one_of(st.sampled_from(sorted(vocab)), st.text(max_size=4)), min_size=1,
                               max_size=4))
    for name in names:
        vocab[name] = data.draw(ids)
    if data.draw(st.booleans()):
        vocab.pop(data.draw(st.sampled_from(sorted(vocab))), None)
    export_variant(model, {"tokenizer.json": dump(tokenizer)})


@BOUNDED
@given(merges())
def test_tokenizer_json_with_hostile_merges(model, value):
    tokenizer = original(model)
    tokenizer["model"]["merges"] = value
    export_variant(model, {"tokenizer.json": dump(tokenizer)})


@BOUNDED
@given(added_tokens(), st.booleans())
def test_tokenizer_json_with_hostile_added_tokens(model, value, append):
    tokenizer = original(model)
    if append and isinstance(value, list):
        tokenizer["added_tokens"] += value
    else:
        tokenizer["added_tokens"] = value
    export_variant(model, {"tokenizer.json": dump(tokenizer)})


special_values = st.one_of(token_texts, json_values, st.fixed_dictionaries({"content": token_texts}))


@BOUNDED
@given(st.sampled_from(["tokenizer_config.json", "special_tokens_map.json"]), st.one_of(
    mangled_json().map(str.encode),
    st.dictionaries(st.sampled_from(["bos_token", "eos_token", "unk_token", "pad_token", "add_bos_token",
                                     "add_eos_token", "additional_special_tokens", "extra_special_tokens",
                                     "added_tokens_decoder", "chat_template", "tokenizer_class"]),
                    special_values, min_size=1, max_size=4).map(dump)))
def test_tokenizer_config_and_special_tokens_map(model, name, raw):
    if name == "tokenizer_config.json" and raw.startswith(b"{") and not raw.startswith(b"{}"):
        try:  # keep the rest of the real config around the hostile keys
            raw = dump({**original(model, name), **json.loads(raw)})
        except ValueError:
            pass
    export_variant(model, {name: raw})


@BOUNDED
@given(st.sampled_from(["tokenizer.json", "tokenizer.model", "chat_template.json", "chat_template.jinja"]),
       st.one_of(st.binary(max_size=200), mangled_json().map(str.encode)), st.booleans())
def test_raw_bytes_as_a_tokenizer_file(model, name, raw, without_json):
    files: dict[str, bytes | None] = {name: raw}
    if without_json and name == "tokenizer.model":
        files["tokenizer.json"] = None
    export_variant(model, files)
