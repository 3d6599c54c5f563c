"""Tokenizers proven on llama.cpp's own test vectors (tests/data/llama_cpp_vocab, from llama.cpp, MIT).

For each vocabulary that transformers can load from llama.cpp's GGUF: transformers builds the tokenizer, a tiny model
with it goes through `bitcpm convert --format gguf`, bitcpm must name the pre-tokenizer as llama.cpp's converter does,
and llama.cpp's tokenization of every `.inp` case with bitcpm's GGUF must be the `.out` ids. Where transformers' own
tokenization differs from `.out`, that is transformers' difference: it is counted and reported (record_property),
not asserted.
"""

import json
import lzma
from pathlib import Path

import pytest

pytest.importorskip("gguf", reason="GGUF tests need the gguf extra: pip install -e '.[gguf]'")
llama_cpp = pytest.importorskip("llama_cpp", reason="llama.cpp tests need llama-cpp-python (the gguf extra)")

from tests.integration.test_gguf import qat_model  # noqa: E402

VOCABS = Path(__file__).resolve().parents[1] / "data" / "llama_cpp_vocab"


def cases(name: str) -> list[tuple[str, list[int]]]:
    texts = (VOCABS / f"ggml-vocab-{name}.gguf.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    ids = (VOCABS / f"ggml-vocab-{name}.gguf.out").read_text(encoding="utf-8").split("\n")
    return [(text, [int(i) for i in line.split()]) for text, line in zip(texts, ids)]


def byte_level_as_released(tokenizer, reference):
    """transformers' tokenizer from a byte-level BPE GGUF (`reference`: that file in llama.cpp), with what the file
    states and transformers 5.24 does not rebuild, so that it is the vocabulary's released tokenizer: the
    pre-tokenizer (llama.cpp's regexes for the file's `tokenizer.ggml.pre`, from pretokenizers.json; transformers
    splits deepseek, falcon and starcoder text as GPT-2 does), `ignore_merges` as llama.cpp sets it for that name, BOS
    when llama.cpp adds it, and the control / user-defined tokens as added tokens under their own text at their own
    ids (transformers re-spells deepseek's `<｜begin▁of▁sentence｜>` and appends a second one), those after the last
    plain token outside the BPE vocabulary as in the released tokenizer.json files. The merges are transformers'.
    The probe hash of the result then names the released tokenizer."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    pre = json.loads((VOCABS / "pretokenizers.json").read_text(encoding="utf-8"))[
        reference.metadata["tokenizer.ggml.pre"]]
    handle = llama_cpp.llama_model_get_vocab(reference.model)
    count = llama_cpp.llama_vocab_n_tokens(handle)
    tokens = [llama_cpp.llama_vocab_get_text(handle, i).decode() for i in range(count)]
    attrs = [llama_cpp.llama_vocab_get_attr(handle, i) for i in range(count)]
    added = {i: bool(attr & llama_cpp.LLAMA_TOKEN_ATTR_CONTROL) for i, attr in enumerate(attrs)
             if attr & (llama_cpp.LLAMA_TOKEN_ATTR_CONTROL | llama_cpp.LLAMA_TOKEN_ATTR_USER_DEFINED)}
    plain = max(i for i in range(count) if i not in added)
    data = json.loads(tokenizer.backend_tokenizer.to_str())
    data["model"]["vocab"] = {tokens[i]: i for i in range(plain + 1)}
    data["added_tokens"] = [{"id": i, "content": tokens[i], "single_word": False, "lstrip": False, "rstrip": False,
                             "normalized": False, "special": special} for i, special in added.items()]
    data["model"]["ignore_merges"] = pre["ignore_merges"]
    data["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False}
        for regex in pre["regexes"]] + [
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}
    bos_id = llama_cpp.llama_vocab_bos(handle)
    bos, eos = tokens[bos_id], tokens[llama_cpp.llama_vocab_eos(handle)]
    data["post_processor"] = None
    if llama_cpp.llama_vocab_get_add_bos(handle):
        data["post_processor"] = {"type": "TemplateProcessing", "special_tokens": {bos: {"id": bos, "ids": [bos_id],
                                                                                          "tokens": [bos]}},
                                  "single": [{"SpecialToken": {"id": bos, "type_id": 0}},
                                             {"Sequence": {"id": "A", "type_id": 0}}],
                                  "pair": [{"SpecialToken": {"id": bos, "type_id": 0}},
                                           {"Sequence": {"id": "A", "type_id": 0}},
                                           {"Sequence": {"id": "B", "type_id": 1}}]}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(data)), bos_token=bos,
                                   eos_token=eos)


def vocab_tokenizers(name: str, tmp_path: Path):
    """llama.cpp's vocabulary file in llama.cpp, transformers' tokenizer from it, and the tokenizer bitcpm exports."""
    from transformers import AutoTokenizer

    vocab = tmp_path / "vocab" / f"ggml-vocab-{name}.gguf"
    vocab.parent.mkdir()
    vocab.write_bytes(lzma.decompress((VOCABS / f"{vocab.name}.xz").read_bytes()))
    reference = llama_cpp.Llama(model_path=str(vocab), vocab_only=True, verbose=False)
    loaded = AutoTokenizer.from_pretrained(vocab.parent, gguf_file=vocab.name)
    if reference.metadata["tokenizer.ggml.model"] == "llama":
        return reference, loaded, loaded
    return reference, loaded, byte_level_as_released(loaded, reference)


def model_with(tokenizer, folder: Path) -> None:
    """The smallest model that carries the tokenizer: one layer of 32-wide rows (Q4_0 blocks: --gguf-type auto)."""
    qat_model(folder, group_size=-1, vocab_size=len(tokenizer), hidden_size=32, intermediate_size=32,
              num_hidden_layers=1, num_attention_heads=1, num_key_value_heads=1, head_dim=32)
    for path in folder.glob("*"):
        if path.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            path.unlink()
    tokenizer.save_pretrained(folder)


# the tokenizer.ggml.pre bitcpm must write: the one in llama.cpp's file, except qwen35, whose file is qwen2's vocabulary
# and merges under the name "qwen35": on it both split the probe alike, and convert_hf_to_gguf.py names it qwen2
@pytest.mark.parametrize("name, pre", [
    ("llama-spm", "default"), ("phi-3", "default"), ("gpt-2", "gpt-2"), ("starcoder", "starcoder"),
    ("falcon", "falcon"), ("deepseek-coder", "deepseek-coder"), ("deepseek-llm", "deepseek-llm"),
    ("llama-bpe", "llama-bpe"), ("qwen2", "qwen2"), ("qwen35", "qwen2")])
def test_llamacpp_tokenizes_like_its_own_vocab_tests(tmp_path, invoke, record_property, name, pre):
    reference, loaded, tokenizer = vocab_tokenizers(name, tmp_path)
    assert reference.metadata["tokenizer.ggml.pre"] == (pre if name != "qwen35" else "qwen35")
    model_with(tokenizer, tmp_path / "qat")
    result = invoke("convert", "-i", tmp_path / "qat", "-o", tmp_path / "m.gguf", "--format", "gguf",
                    "--gguf-type", "auto")
    assert result.exit_code == 0, result.output
    llm = llama_cpp.Llama(model_path=str(tmp_path / "m.gguf"), vocab_only=True, verbose=False)
    assert llm.metadata["tokenizer.ggml.pre"] == pre
    vectors = cases(name)
    assert len(vectors) >= 47
    wrong = [text for text, ids in vectors if llm.tokenize(text.encode(), add_bos=False, special=False) != ids]
    assert not wrong, f"{len(wrong)} of {len(vectors)} cases differ, first {wrong[0]!r}"
    # added tokens: matched whole as transformers matches them, and typed as in llama.cpp's own file
    for added in tokenizer.added_tokens_decoder.values():
        text = added.content.encode()
        assert llm.tokenize(text, add_bos=False, special=True) == \
            tokenizer(added.content, add_special_tokens=False)["input_ids"], added
        for special in (False, True):
            assert llm.tokenize(text, add_bos=False, special=special) == \
                reference.tokenize(text, add_bos=False, special=special), (added, special)
    for key, hf in (("transformers_mismatches", tokenizer), ("transformers_gguf_loader_mismatches", loaded)):
        differ = sum(hf(text, add_special_tokens=False)["input_ids"] != ids for text, ids in vectors)
        record_property(key, f"{differ}/{len(vectors)}")


def test_unknown_byte_level_pretokenizer_is_refused(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from bitcpm_cli.core.errors import InputError
    from bitcpm_cli.core.conversion.gguf.export import export_gguf

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                  pre_tokenizers.ByteLevel(add_prefix_space=False)])
    core.decoder = decoders.ByteLevel()
    core.train_from_iterator(["hello 123 world"] * 10, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    qat_model(tmp_path / "m", group_size=-1)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "m" / name).unlink()
    PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>").save_pretrained(tmp_path / "m")
    with pytest.raises(InputError, match="does not know this tokenizer's pre-tokenizer"):
        export_gguf(tmp_path / "m", tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


def test_ignore_merges_that_llamacpp_would_not_apply_is_refused(tmp_path, invoke):
    """llama.cpp applies the merges under deepseek-coder's pre-tokenizer: a tokenizer.json that ignores them for
    words that are one token whole is refused (exit 2, nothing written), not exported to tokenize differently."""
    _, _, tokenizer = vocab_tokenizers("deepseek-coder", tmp_path)
    tokenizer.backend_tokenizer.model.ignore_merges = True
    model_with(tokenizer, tmp_path / "qat")
    before = {path.name: path.read_bytes() for path in (tmp_path / "qat").iterdir()}
    result = invoke("convert", "-i", tmp_path / "qat", "-o", tmp_path / "m.gguf", "--format", "gguf",
                    "--gguf-type", "auto")
    assert result.exit_code == 2, result.output
    assert "'deepseek-coder', which applies the BPE merges" in result.output
    assert '"ignore_merges": true' in result.output and "hint:" in result.output
    assert not (tmp_path / "m.gguf").exists() and not list(tmp_path.glob("*.bitcpm-tmp*"))
    assert {path.name: path.read_bytes() for path in (tmp_path / "qat").iterdir()} == before
