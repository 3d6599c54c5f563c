"""Tokenizers proven on llama.cpp's own test vectors (tests/data/llama_cpp_vocab, from llama.cpp, MIT).

For each vocabulary: transformers builds the tokenizer from llama.cpp's GGUF, a tiny model with that tokenizer goes
through `bitcpm convert --format gguf`, and llama.cpp's tokenization of every `.inp` case with bitcpm's GGUF must be
the `.out` ids. Where transformers' own tokenization differs from `.out`, that is transformers' difference: it is
counted and reported (record_property), not asserted.
"""

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


@pytest.mark.parametrize("name, pre", [("llama-spm", "default"), ("phi-3", "default"), ("gpt-2", "gpt-2")])
def test_llamacpp_tokenizes_like_its_own_vocab_tests(tmp_path, invoke, record_property, name, pre):
    import gguf
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(VOCABS, gguf_file=f"ggml-vocab-{name}.gguf")
    qat_model(tmp_path / "qat", group_size=-1, vocab_size=len(tokenizer))
    for path in (tmp_path / "qat").glob("*"):
        if path.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            path.unlink()
    tokenizer.save_pretrained(tmp_path / "qat")
    result = invoke("convert", "-i", tmp_path / "qat", "-o", tmp_path / "m.gguf", "--format", "gguf")
    assert result.exit_code == 0, result.output
    fields = gguf.GGUFReader(str(tmp_path / "m.gguf")).fields
    assert bytes(fields["tokenizer.ggml.pre"].parts[-1]).decode() == pre
    llm = llama_cpp.Llama(model_path=str(tmp_path / "m.gguf"), vocab_only=True, verbose=False)
    vectors = cases(name)
    assert len(vectors) >= 47
    wrong = [text for text, ids in vectors if llm.tokenize(text.encode(), add_bos=False, special=False) != ids]
    assert not wrong, f"{len(wrong)} of {len(vectors)} cases differ, first {wrong[0]!r}"
    transformers_wrong = sum(tokenizer(text, add_special_tokens=False)["input_ids"] != ids for text, ids in vectors)
    record_property("transformers_mismatches", f"{transformers_wrong}/{len(vectors)}")


def test_unknown_byte_level_pretokenizer_is_refused(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from bitcpm_cli.core.errors import InputError
    from bitcpm_cli.core.gguf_export import export_gguf

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
