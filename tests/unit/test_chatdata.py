"""Chat data read and rendered as LLaMA-Factory does (qwen-style ChatML for tools), with hand-written expectations."""

import json

import pytest

from bitcpm_cli.core.training.chatdata import read_chat_data
from bitcpm_cli.core.errors import InputError
from bitcpm_cli.core.training.sft import IGNORE, encode_conversation

from tests.unit.test_sft import tokenizer, write_jsonl  # noqa: F401 (the fixture)

TOOLS_SYSTEM = (
    "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
    '{"type": "function", "function": {"name": "add", "parameters": {"a": "int"}}}\n</tools>\n\n'
    "For each function call, return a json object with function name and arguments within <tool_call></tool_call> "
    'XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n')
ADD_TOOL = {"name": "add", "parameters": {"a": "int"}}


def write(path, records):
    return str(write_jsonl(path, records))


def rendered(tokenizer, conversation):
    """The training text and the supervised character runs (by token offsets, so unknown characters count too)."""
    text = tokenizer.apply_chat_template(conversation.messages, tools=conversation.tools, tokenize=False)
    example = encode_conversation(tokenizer, conversation.messages, conversation.tools)
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    runs, current = [], ""
    for (start, end), label in zip(offsets, example.labels):
        if label != IGNORE:
            current += text[start:end]
        elif current:
            runs.append(current)
            current = ""
    return text, runs + ([current] if current else [])


def test_alpaca_history_system_and_one_newline_join(tmp_path, tokenizer):
    path = write(tmp_path / "a.jsonl", [{"system": "Be brief.", "history": [["2+2?", "4"]], "instruction": "Add",
                                         "input": "3+3", "output": "6", "id": 7}])
    data = read_chat_data([path])
    text, supervised = rendered(tokenizer, data.conversations[0])
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n"
                    "<|im_start|>assistant\n4<|im_end|>\n<|im_start|>user\nAdd\n3+3<|im_end|>\n"
                    "<|im_start|>assistant\n6<|im_end|>\n")
    assert supervised == ["4<|im_end|>\n", "6<|im_end|>\n"]
    assert data.formats == {path: "alpaca"} and data.ignored_fields == {"id": 1}


def test_sharegpt_top_level_system_tools_function_call_observation(tmp_path, tokenizer):
    record = {"system": "Use tools.", "tools": json.dumps([ADD_TOOL]), "conversations": [
        {"from": "human", "value": "2+2?"},
        {"from": "function_call", "value": json.dumps({"name": "add", "arguments": {"a": 2, "b": 2}})},
        {"from": "observation", "value": "4"},
        {"from": "gpt", "value": "It is 4."},
        {"from": "human", "value": "Thanks"},
        {"from": "gpt", "value": "Welcome."}]}
    data = read_chat_data([write(tmp_path / "s.jsonl", [record])])
    text, supervised = rendered(tokenizer, data.conversations[0])
    call = '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 2}}\n</tool_call><|im_end|>\n'
    assert text == ("<|im_start|>system\nUse tools." + TOOLS_SYSTEM + "<|im_start|>user\n2+2?<|im_end|>\n"
                    "<|im_start|>assistant\n" + call +
                    "<|im_start|>user\n<tool_response>\n4\n</tool_response><|im_end|>\n"
                    "<|im_start|>assistant\nIt is 4.<|im_end|>\n<|im_start|>user\nThanks<|im_end|>\n"
                    "<|im_start|>assistant\nWelcome.<|im_end|>\n")
    assert supervised == [call, "It is 4.<|im_end|>\n", "Welcome.<|im_end|>\n"]
    assert data.ignored_fields == {}


def test_openai_tool_calls_and_merged_tool_messages(tmp_path, tokenizer):
    calls = [{"id": "c1", "type": "function", "function": {"name": "add", "arguments": {"a": 1}}},
             {"id": "c2", "type": "function", "function": {"name": "add", "arguments": {"a": 2}}}]
    record = {"tools": [ADD_TOOL], "messages": [
        {"role": "system", "content": "S"}, {"role": "user", "content": "Go"},
        {"role": "assistant", "content": "", "tool_calls": calls},
        {"role": "tool", "content": "r1", "tool_call_id": "c1"}, {"role": "tool", "content": "r2"},
        {"role": "assistant", "content": "Done."}]}
    data = read_chat_data([write(tmp_path / "o.jsonl", [record])])
    text, supervised = rendered(tokenizer, data.conversations[0])
    call = ('<tool_call>\n{"name": "add", "arguments": {"a": 1}}\n</tool_call>\n'
            '<tool_call>\n{"name": "add", "arguments": {"a": 2}}\n</tool_call><|im_end|>\n')
    assert text == ("<|im_start|>system\nS" + TOOLS_SYSTEM + "<|im_start|>user\nGo<|im_end|>\n<|im_start|>assistant\n"
                    + call + "<|im_start|>user\n<tool_response>\nr1\n</tool_response>\n<tool_response>\nr2\n"
                    "</tool_response><|im_end|>\n<|im_start|>assistant\nDone.<|im_end|>\n")
    assert supervised == [call, "Done.<|im_end|>\n"]
    assert data.formats[str(tmp_path / "o.jsonl")] == "openai"
    assert data.ignored_fields == {"messages[].tool_call_id": 1}  # counted, not silently dropped


def test_column_mapping_flags_and_dataset_info(tmp_path, tokenizer):
    path = write(tmp_path / "q.jsonl", [{"question": "Hi", "answer": "Hello", "past": [["a", "b"]]}])
    data = read_chat_data([path], columns=["prompt=question", "response=answer", "history=past"])
    assert [m["content"] for m in data.conversations[0].messages] == ["a", "b", "Hi", "Hello"]
    info = tmp_path / "dataset_info.json"
    info.write_text(json.dumps({"mine": {"file_name": "t.jsonl", "formatting": "sharegpt",
                                         "columns": {"messages": "chat"},
                                         "tags": {"role_tag": "who", "content_tag": "text", "user_tag": "me",
                                                  "assistant_tag": "bot"}}}))
    other = write(tmp_path / "t.jsonl", [{"chat": [{"who": "me", "text": "Hi"}, {"who": "bot", "text": "Yo"}]}])
    data = read_chat_data([other], columns=[str(info)])
    assert data.conversations[0].messages == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]
    with pytest.raises(InputError, match="'answer_col' is not one of formatting"):
        read_chat_data([path], columns=["answer_col=x"])
    with pytest.raises(InputError, match="dataset_info.json has no entry whose file_name is q.jsonl"):
        read_chat_data([path], columns=[str(info)])
    info.write_text(json.dumps({"pairs": {"file_name": "q.jsonl", "ranking": True, "num_samples": 5}}))
    with pytest.raises(InputError, match="q.jsonl: num_samples, ranking not supported"):
        read_chat_data([path], columns=[str(info)])


def test_abnormal_records_are_counted_media_refused(tmp_path):
    broken = {"conversations": [{"from": "gpt", "value": "no user first"}]}
    good = {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]}
    data = read_chat_data([write(tmp_path / "b.jsonl", [good, broken, good])])
    assert len(data.conversations) == 2 and sum(data.skipped.values()) == 1
    assert data.skipped_where[0].startswith(f"{tmp_path / 'b.jsonl'}:2: turn 1 is assistant")
    with pytest.raises(InputError, match="images data is not supported"):
        read_chat_data([write(tmp_path / "i.jsonl", [{**good, "images": ["x.png"]}])])
