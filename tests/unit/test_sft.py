import json

import pytest

from bitcpm_cli.core.training.chatdata import read_chat_data
from bitcpm_cli.core.errors import InputError
from bitcpm_cli.core.training.recipe import resolve_config
from bitcpm_cli.core.training.sft import (
    IGNORE,
    SftConfig,
    build_examples,
    encode_conversation,
    pack,
    setup_chat_tokenizer,
)

from tests.helpers import build_char_tokenizer

MULTI_TURN = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "and 3+3?"},
    {"role": "assistant", "content": "6, of course."},
]


@pytest.fixture
def tokenizer(tmp_path):
    tok = build_char_tokenizer(tmp_path / "tok")
    setup_chat_tokenizer(tok, None)
    return tok


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def config(tmp_path, data, **changes):
    return resolve_config(SftConfig, None, {"model": "m", "data": [str(d) for d in data], "output_dir": "o", **changes})


def test_three_formats_normalise_to_the_same_conversation(tmp_path):
    expected = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q\nI"},
                {"role": "assistant", "content": "A"}]
    messages = write_jsonl(tmp_path / "m.jsonl", [{"messages": expected}])
    sharegpt = write_jsonl(tmp_path / "s.jsonl", [{"conversations": [
        {"from": "system", "value": "S"}, {"from": "human", "value": "Q\nI"}, {"from": "gpt", "value": "A"}]}])
    alpaca = tmp_path / "a.json"
    alpaca.write_text(json.dumps([{"system": "S", "instruction": "Q", "input": "I", "output": "A"}]))
    data = read_chat_data([str(messages), str(sharegpt), str(alpaca)])
    assert [c.messages for c in data.conversations] == [expected, expected, expected]
    assert list(data.formats.values()) == ["openai", "sharegpt", "alpaca"]


def test_forced_format_and_undetectable_records(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(InputError, match=r"x.jsonl:1: alpaca records need"):
        read_chat_data([str(path)], "alpaca")
    other = write_jsonl(tmp_path / "y.jsonl", [{"text": "hi"}])
    with pytest.raises(InputError, match="cannot tell the chat format"):
        read_chat_data([str(other)])


def test_malformed_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"messages": []}\n{oops\n')
    with pytest.raises(InputError, match=r"bad.jsonl:2: not valid JSON"):
        read_chat_data([str(path)])


def test_masks_cover_exactly_the_assistant_turns(tokenizer):
    example = encode_conversation(tokenizer, MULTI_TURN)
    supervised_runs, run = [], []
    for token, label in zip(example.input_ids, example.labels):
        if label != IGNORE:
            assert label == token
            run.append(token)
        elif run:
            supervised_runs.append(tokenizer.decode(run))
            run = []
    if run:
        supervised_runs.append(tokenizer.decode(run))
    assert supervised_runs == ["4<|im_end|>\n", "6, of course.<|im_end|>\n"]
    masked = tokenizer.decode([t for t, l in zip(example.input_ids, example.labels) if l == IGNORE])
    assert "Be brief." in masked and "2+2?" in masked and "and 3+3?" in masked and "of course" not in masked


def test_no_assistant_turn_is_skipped_and_counted(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": MULTI_TURN}, {"messages": MULTI_TURN[:2]}])
    data = build_examples(config(tmp_path, [path]), tokenizer)
    assert data.summary["skipped_abnormal"] == 1 and data.summary["examples_used"] == 1
    assert data.summary["notes"][0] == "skipped 1 record(s): the last turn is not an assistant turn (as LLaMA-Factory skips them)"
    only_users = write_jsonl(tmp_path / "u.jsonl", [{"messages": MULTI_TURN[:2]}])
    with pytest.raises(InputError, match="no usable training examples"):
        build_examples(config(tmp_path, [only_users]), tokenizer)


def test_truncation_never_leaves_an_example_without_supervision(tmp_path, tokenizer):
    long_prompt = [{"role": "user", "content": "x" * 80}, {"role": "assistant", "content": "short"}]
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": MULTI_TURN}, {"messages": long_prompt}])
    data = build_examples(config(tmp_path, [path], max_length=60), tokenizer)
    assert data.summary["dropped_by_truncation"] == 1 and data.summary["truncated"] == 2
    assert len(data.examples) == 1 and all(len(e.input_ids) <= 60 and e.supervised for e in data.examples)


def test_packing_keeps_examples_whole(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": MULTI_TURN[1:3]}] * 6)
    single = build_examples(config(tmp_path, [path]), tokenizer).examples
    packed = pack(single, max_length=3 * len(single[0].input_ids))
    assert len(packed) == 2 and packed[0].labels == single[0].labels * 3


def test_template_choices(tmp_path):
    tok = build_char_tokenizer(tmp_path / "tok")
    custom = tmp_path / "t.jinja"
    custom.write_text("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                      "{% if add_generation_prompt %}assistant: {% endif %}")
    setup_chat_tokenizer(tok, str(custom))
    example = encode_conversation(tok, MULTI_TURN[1:3])
    assert tok.decode([t for t, l in zip(example.input_ids, example.labels) if l != IGNORE]) == "4\n"
    with pytest.raises(InputError, match="neither auto, chatml nor a file"):
        setup_chat_tokenizer(tok, "llama9")
