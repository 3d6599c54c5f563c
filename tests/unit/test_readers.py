"""The careful readers (core/io/readers.py, core/io/safetensors.py, core/formats/results.py): every limit and check, with the error naming file and line or field."""

import json
import struct
import subprocess
import sys

import pytest

from bitcpm_cli.core.model.checkpoint import find_weight_files, read_safetensors_header
from bitcpm_cli.core.errors import BitcpmError, ConfigError, InputError
from bitcpm_cli.core.io.readers import (
    MAX_JSON_DEPTH,
    iter_text_lines,
    parse_json,
    parse_yaml,
    read_json_file,
    read_text_file,
)
from bitcpm_cli.core.formats.results import read_results


def test_json_depth_huge_ints_and_non_finite_numbers_are_refused():
    assert parse_json("[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH, "f") == eval("[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH)
    for text, message in (("[" * (MAX_JSON_DEPTH + 1) + "]" * (MAX_JSON_DEPTH + 1), "nested too deeply"),
                          ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
                          ('{"a": ' + "9" * 5000 + "}", "integer with 5000 digits"),
                          ('{"a": NaN}', "NaN is not valid JSON"), ('{"a": 1e999}', "out of range"),
                          ('{"a": -Infinity}', "Infinity")):
        with pytest.raises(InputError, match=message):
            parse_json(text, "file.json")


def test_json_syntax_error_names_file_line_and_column(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{\n  "a": 1,\n  oops\n}')
    with pytest.raises(InputError, match=r"config.json is not valid JSON \(.*config.json, line 3 column 3\)"):
        read_json_file(path, "config.json")


def test_invalid_utf8_is_reported_as_file_line(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_bytes(b"fine\nalso fine\nbad \xff byte\n")
    with pytest.raises(InputError, match=r"prompts.txt:3, column 5"):
        read_text_file(path, "prompts file")
    with pytest.raises(InputError, match=r"prompts.txt:3"):
        list(iter_text_lines(path))
    path.write_bytes("\ufeffcafé\r\nok\n".encode())
    assert list(iter_text_lines(path)) == [(1, "café"), (2, "ok")]


def test_yaml_alias_bomb_is_refused_before_expansion():
    bomb = 'a: &a ["x","x","x","x","x","x","x","x","x"]\n'
    for level in "bcdefghi":
        previous = chr(ord(level) - 1)
        bomb += f"{level}: &{level} [" + ",".join(f"*{previous}" for _ in range(9)) + "]\n"
    with pytest.raises(ConfigError, match="expands to more than"):
        parse_yaml(bomb, "recipe.yaml")
    assert parse_yaml("base: &b {lr: 1}\nrun: *b\n", "ok.yaml") == {"base": {"lr": 1}, "run": {"lr": 1}}
    with pytest.raises(ConfigError, match=r"not valid YAML \(x.yaml, line 1"):
        parse_yaml("a: [", "x.yaml")
    with pytest.raises(ConfigError, match="cannot be read"):
        parse_yaml("max_steps: " + "9" * 5000, "x.yaml")
    with pytest.raises(ConfigError, match="unacceptable character"):  # found by the fuzz suite
        parse_yaml("\x00", "x.yaml")


def safetensors(path, header: dict, data: bytes):
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


@pytest.mark.parametrize("header,size,message", [
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, 12, "overlap"),
    ({"a": {"dtype": "F32", "shape": [1000, 1000], "data_offsets": [0, 8]}}, 8, r"needs 4000000 bytes"),
    ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, 8, "truncated"),
    ({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, 8, "malformed"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, 8, "invalid offsets"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [True, 8]}}, 8, "malformed"),
    ({"a": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 8]}}, 8, "malformed"),
    ({"__metadata__": {"k": 1}}, 0, "__metadata__"),
    # found by the fuzz suite: the safetensors library refuses these itself, so they must be exit 2 first
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, 16, "8 bytes after the last tensor"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}, 16, "bytes 0-8 belong to no tensor"),
    # an empty tensor inside another's bytes: the safetensors library refuses it ("invalid offset")
    ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
      "e": {"dtype": "F32", "shape": [0], "data_offsets": [8, 8]}}, 16, "overlap"),
])
def test_safetensors_header_checks(tmp_path, header, size, message):
    path = safetensors(tmp_path / "m.safetensors", header, b"\0" * size)
    with pytest.raises(InputError, match=message):
        read_safetensors_header(path)


def results(tmp_path, document):
    path = tmp_path / "r.json"
    path.write_text(json.dumps(document))
    return path


@pytest.mark.parametrize("result,message", [
    ({"id": [1], "token_ids": [1]}, r"results\[0\].id: must be an integer or a string"),
    ({"prompt": {"x": 1}, "token_ids": [1]}, r"results\[0\].prompt: must be a string"),
    ({"token_ids": [-1]}, r"results\[0\].token_ids"),
    ({"token_ids": [True, False]}, r"results\[0\].token_ids"),
    ({"token_ids": [2**40]}, r"results\[0\].token_ids"),
    ({"token_ids": [1], "top_logprobs": [[["x", 0.5]]]}, r"results\[0\].top_logprobs"),
])
def test_results_fields_are_checked(tmp_path, result, message):
    with pytest.raises(InputError, match=message):
        read_results(results(tmp_path, {"schema": "bitcpm.results/1", "results": [result]}))


def test_results_schema_version_and_duplicate_ids(tmp_path):
    with pytest.raises(InputError, match="'bitcpm.results/2' is not 'bitcpm.results/1'"):
        read_results(results(tmp_path, {"schema": "bitcpm.results/2", "results": [{"token_ids": [1]}]}))
    with pytest.raises(InputError, match="appear more than once"):
        read_results(results(tmp_path, [{"id": 1, "token_ids": [1]}, {"id": 1, "token_ids": [2]}]))
    with pytest.raises(InputError, match="sampling.temperature"):
        read_results(results(tmp_path, {"schema": "bitcpm.results/1", "sampling": {"temperature": "hot"},
                                        "results": [{"token_ids": [1]}]}))
    meta, items = read_results(results(tmp_path, [{"token_ids": [1, 2]}]))
    assert meta == {} and items == [{"token_ids": [1, 2]}]


@pytest.mark.parametrize("shard,message", [
    ("../other/x.safetensors", "points outside the model folder"),
    ("/etc/passwd", "points outside the model folder"),
    (["model.safetensors"], "is not a file name"),
    (7, "is not a file name"),
    ("link.safetensors", "leads outside the model folder through a symlink"),
])
def test_shard_index_entries_are_confined(tmp_path, shard, message):
    (tmp_path / "other").mkdir()
    safetensors(tmp_path / "other" / "x.safetensors", {"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}},
                b"\0" * 4)
    model = tmp_path / "model"
    model.mkdir()
    (model / "link.safetensors").symlink_to(tmp_path / "other" / "x.safetensors")
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": shard}}))
    with pytest.raises(BitcpmError, match=message) as info:
        find_weight_files(model)
    assert "'w'" in info.value.message  # the entry is named


def test_empty_tensors_where_one_ends_are_read_and_hashed_once(tmp_path):
    import hashlib

    import torch
    from safetensors.torch import load_file

    from bitcpm_cli.core.model.checkpoint import iter_safetensors

    values = struct.pack("<4f", 1, 2, 3, 4)
    header = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},  # listed before the empty one
              "b": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]},
              "e": {"dtype": "F32", "shape": [0], "data_offsets": [8, 8]}}
    path = safetensors(tmp_path / "m.safetensors", header, values)
    digest = hashlib.sha256()
    read = dict(iter_safetensors(path, digest))
    assert digest.hexdigest() == hashlib.sha256(path.read_bytes()).hexdigest()  # every byte once
    expected = load_file(path)
    assert set(read) == set(expected) and all(torch.equal(read[n], expected[n]) for n in expected)


def test_json_prompt_files_are_read_without_torch(tmp_path):
    # `infer -m x.gguf --prompts p.jsonl` stays on the torch-free llama.cpp path
    (tmp_path / "p.jsonl").write_text('{"prompt": "Hi"}\n{"messages": [{"role": "user", "content": "Yo"}]}\n')
    (tmp_path / "p.json").write_text('[{"prompt": "Hi"}]')
    code = ("import sys; from bitcpm_cli.core.engines.prompts import read_prompts; "
            "assert len(read_prompts(None, sys.argv[1])) == 2 and len(read_prompts(None, sys.argv[2])) == 1; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "p.jsonl"), str(tmp_path / "p.json")],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
