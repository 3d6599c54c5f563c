"""Regression tests for each class of the hostile-user report: inputs destroyed, code executed, reads outside the
model folder, tracebacks instead of exit 2, accepted nonsense, internal errors. Each checks the exit code, the
message, that nothing was written and that every input is byte-identical afterwards."""

import errno
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fuzz.hostile import make_remote_code_folder, snapshot, write_hostile_bin
from tests.helpers import build_tiny_model
from tests.unit.test_convert import make_qat

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "configs" / "pretrain" / "tiny-cpu.yaml"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("safety") / "fused")


@pytest.fixture(scope="module")
def qat(tmp_path_factory):
    folder = tmp_path_factory.mktemp("safety-qat") / "qat"
    make_qat(folder, group_size=-1)
    return folder


def results_doc(ids=(5, 6), **extra):
    return {"schema": "bitcpm.results/1", "results": [{"id": 0, "prompt": "p", "token_ids": list(ids)}], **extra}


def write(path: Path, content) -> Path:
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


def no_traceback(result) -> bool:
    return "Traceback" not in result.output and "Traceback" not in (result.stderr or "")


# ---- inputs destroyed ------------------------------------------------------------------------------------
def test_infer_output_inside_the_model_folder_is_refused(invoke, model, tmp_path):
    before = snapshot(model)
    result = invoke("infer", "-m", model, "-p", "Hi", "-o", model / "model.safetensors", "--device", "cpu")
    assert result.exit_code == 2 and "inside the input" in result.stderr and no_traceback(result)
    assert snapshot(model) == before


def test_compare_report_over_an_input_is_refused(invoke, tmp_path):
    a, b = write(tmp_path / "a.json", results_doc()), write(tmp_path / "b.json", results_doc())
    before = snapshot(tmp_path)
    result = invoke("compare", a, b, "--output", a)
    assert result.exit_code == 2 and "is the input" in result.stderr
    assert snapshot(tmp_path) == before


def test_existing_results_need_overwrite(invoke, model, tmp_path):
    out = write(tmp_path / "r.json", "keep me")
    result = invoke("infer", "-m", model, "-p", "Hi", "-o", out, "--device", "cpu", "--max-new-tokens", "2", "-q")
    assert result.exit_code == 2 and "already exists" in result.stderr and out.read_text() == "keep me"
    result = invoke("infer", "-m", model, "-p", "Hi", "-o", out, "--device", "cpu", "--max-new-tokens", "2", "-q",
                    "--overwrite")
    assert result.exit_code == 0 and json.loads(out.read_text())["schema"] == "bitcpm.results/1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]


def test_two_concurrent_converts_exactly_one_wins(qat, tmp_path):
    command = [sys.executable, "-m", "bitcpm_cli", "convert", "-i", str(qat), "-o", str(tmp_path / "fused")]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    runs = [subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env=env) for _ in range(2)]
    outcomes = sorted((run.wait(300), run.stderr.read()) for run in runs)
    for run in runs:
        run.stdout.close()
        run.stderr.close()
    assert [code for code, _ in outcomes] == [0, 2], outcomes
    assert "another bitcpm run" in outcomes[1][1] or "already exists" in outcomes[1][1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fused"]
    assert (tmp_path / "fused" / "model.safetensors").is_file()


def test_staging_left_by_a_killed_convert_is_removed_by_the_next_run(invoke, qat, tmp_path):
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    stale = tmp_path / f".bitcpm-tmp-{process.pid}-fused"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    write(tmp_path / ".bitcpm-claim-fused", f"{process.pid}\n")
    result = invoke("convert", "-i", qat, "-o", tmp_path / "fused")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fused"]


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS])
def test_full_or_read_only_disk_is_exit_2_with_nothing_left(invoke, qat, tmp_path, monkeypatch, code):
    from bitcpm_cli.core.io import safetensors

    def fail(self, name, tensor):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(safetensors.SafetensorsStreamWriter, "write", fail)
    before = snapshot(qat)
    result = invoke("convert", "-i", qat, "-o", tmp_path / "fused")
    assert result.exit_code == 2 and f"cannot write --output {tmp_path / 'fused'}: {os.strerror(code)}" in result.stderr
    assert list(tmp_path.iterdir()) == [] and snapshot(qat) == before and no_traceback(result)


# ---- code executed ---------------------------------------------------------------------------------------
@pytest.fixture()
def evil(model, tmp_path):
    marker = tmp_path / "MARKER"
    return make_remote_code_folder(tmp_path / "evil", model, marker), marker


def test_remote_code_never_runs_without_the_flag(invoke, evil, tmp_path):
    folder, marker = evil
    a = write(tmp_path / "a.json", results_doc())
    chat = write(tmp_path / "chat.jsonl", json.dumps({"messages": [{"role": "user", "content": "1"},
                                                                   {"role": "assistant", "content": "2"}]}) + "\n")
    corpus = write(tmp_path / "c.txt", "1 2 3 4 5 6 7 8\n" * 50)
    commands = [
        ("compare", a, a, "--tokenizer", folder),
        ("infer", "-m", folder, "-p", "Hi", "-o", tmp_path / "r.json", "--device", "cpu"),
        ("sft", "--model", folder, "--data", chat, "--preview", "1"),
        ("train", "--config", RECIPE, "--model", folder, "--data", corpus, "--output-dir", tmp_path / "run"),
    ]
    before = snapshot(folder)
    for args in commands:
        result = invoke(*args, input="y\ny\n")  # a prompt, if there were one, would be answered yes
        assert result.exit_code == 2, (args[0], result.output)
        assert "--trust-remote-code" in result.stderr and no_traceback(result)
        assert not marker.exists(), args[0]
    assert snapshot(folder) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "c.txt", "chat.jsonl", "evil"]


def test_compare_with_stdin_closed_never_prompts(evil, tmp_path):
    folder, marker = evil
    a = write(tmp_path / "a.json", results_doc())
    run = subprocess.run([sys.executable, "-m", "bitcpm_cli", "compare", str(a), str(a), "--tokenizer", str(folder)],
                         stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert run.returncode == 2 and "error: refusing to load" in run.stderr and "[y/N]" not in run.stdout + run.stderr
    assert not marker.exists()


def test_gguf_export_refuses_a_tokenizer_that_asks_for_code(invoke, model, tmp_path):
    pytest.importorskip("gguf")
    folder, marker = make_remote_code_folder(tmp_path / "evil", model, tmp_path / "MARKER"), tmp_path / "MARKER"
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="llama")
    config.pop("auto_map")
    write(folder / "config.json", config)
    result = invoke("convert", "-i", folder, "-o", tmp_path / "m.gguf", "--format", "gguf", input="y\n")
    assert result.exit_code == 2 and "auto_map" in result.stderr and not marker.exists()
    assert not (tmp_path / "m.gguf").exists()


def test_hostile_pickle_never_runs(invoke, tmp_path):
    marker = tmp_path / "MARKER"
    folder = tmp_path / "m"
    folder.mkdir()
    write(folder / "config.json", {"model_type": "llama"})
    write_hostile_bin(folder / "pytorch_model.bin", marker)
    for args in (("convert", "-i", folder / "pytorch_model.bin", "-o", tmp_path / "out.safetensors",
                  "--quant-type", "ternary"), ("fix-config", folder)):
        result = invoke(*args)
        assert result.exit_code == 2 and "refusing to load" in result.stderr and not marker.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


# ---- reads outside the model folder --------------------------------------------------------------------
@pytest.mark.parametrize("shard", ["../other/model.safetensors", "ABSOLUTE", "/etc/passwd", ["x"], 3])
def test_index_entries_outside_the_folder_are_refused(invoke, qat, tmp_path, shard):
    import shutil

    shutil.copytree(qat, tmp_path / "other")
    model = tmp_path / "model"
    model.mkdir()
    shutil.copy(qat / "config.json", model / "config.json")
    from safetensors import safe_open

    with safe_open(str(qat / "model.safetensors"), "pt") as handle:
        names = list(handle.keys())
    target = str(tmp_path / "other" / "model.safetensors") if shard == "ABSOLUTE" else shard
    write(model / "model.safetensors.index.json", {"weight_map": {name: target for name in names}})
    before = snapshot(tmp_path)
    for args in (("fix-config", model), ("convert", "-i", model, "-o", tmp_path / "out")):
        result = invoke(*args)
        assert result.exit_code == 2 and "weight index entry" in result.stderr and no_traceback(result), result.output
    assert snapshot(tmp_path) == before


# ---- tracebacks instead of exit 2 ------------------------------------------------------------------------
DEEP = "[" * 5000 + "]" * 5000
HUGE = "9" * 5000


@pytest.mark.parametrize("name,content,message", [
    ("config.json", DEEP, "nested too deeply"),
    ("config.json", '{"vocab_size": ' + HUGE + "}", "integer with 5000 digits"),
])
def test_malformed_config_json_is_exit_2(invoke, model, tmp_path, name, content, message):
    import shutil

    folder = tmp_path / "m"
    shutil.copytree(model, folder)
    write(folder / name, content)
    before = snapshot(tmp_path)
    for args in (("fix-config", folder), ("infer", "-m", folder, "-p", "x", "-o", tmp_path / "r.json")):
        result = invoke(*args)
        assert result.exit_code == 2 and message in result.stderr and no_traceback(result)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("content,message", [
    (DEEP, "nested too deeply"), ('{"schema": "bitcpm.results/1", "results": [{"token_ids": [' + HUGE + "]}]}",
                                  "5000 digits"),
    (results_doc(ids=(True, False)), "token_ids"), (results_doc(ids=(-1,)), "token_ids"),
    ({"schema": "bitcpm.results/1", "results": [{"id": {"a": 1}, "prompt": ["x"], "token_ids": [1]}]},
     "results[0].prompt: must be a string"),
    ({"schema": "bitcpm.results/7", "results": [{"token_ids": [1]}]}, "bitcpm.results/7"),
    (b"\xff\xfe not utf-8", "not valid UTF-8"),
])
def test_malformed_results_are_exit_2(invoke, tmp_path, content, message):
    bad = tmp_path / "bad.json"
    bad.write_bytes(content) if isinstance(content, bytes) else write(bad, content)
    good = write(tmp_path / "good.json", results_doc())
    before = snapshot(tmp_path)
    result = invoke("compare", bad, good, "--output", tmp_path / "report.json")
    assert result.exit_code == 2 and message in result.stderr and no_traceback(result), result.stderr
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("name,content,message", [
    ("p.jsonl", b'{"prompt": "ok"}\n' + b"[" * 5000 + b"\n", "p.jsonl:2"),
    ("p.jsonl", b'{"prompt": "ok", "id": ' + HUGE.encode() + b"}\n", "5000 digits"),
    ("p.txt", b"fine\nbad \xc3\x28 byte\n", "p.txt:2"),
    ("p.jsonl", b'{"prompt": "ok", "id": [1]}\n', "'id' must be"),
])
def test_malformed_prompts_are_exit_2_before_loading(invoke, model, tmp_path, name, content, message):
    prompts = tmp_path / name
    prompts.write_bytes(content)
    result = invoke("infer", "-m", model, "--prompts", prompts, "-o", tmp_path / "r.json")
    assert result.exit_code == 2 and message in result.stderr and no_traceback(result), result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


def test_sft_preview_on_bad_utf8_exits_2(model, tmp_path, invoke):
    chat = tmp_path / "chat.jsonl"
    chat.write_bytes(b'{"messages": [{"role": "user", "content": "1"}, {"role": "assistant", "content": "\xff"}]}\n')
    result = invoke("sft", "--model", model, "--data", chat, "--preview", "2")  # sft's script runs: test_json_stdout
    assert result.exit_code == 2 and f"{chat}:1" in result.stderr and "Traceback" not in result.output


def test_bad_corpus_and_settings_leave_no_output_folder(invoke, model, tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_bytes(b"1 2 3\n4 5 \xff\n")
    base = ("train", "--config", RECIPE, "--model", model, "--output-dir", tmp_path / "run")
    result = invoke(*base, "--data", corpus)
    assert result.exit_code == 2 and f"{corpus}:2" in result.stderr
    good = write(tmp_path / "g.txt", "1 2 3 4 5 6 7 8 9\n" * 100)
    for override, field in (("adam_beta1=2", "adam_beta1"), ("adam_epsilon=-1", "adam_epsilon"),
                            ("lr=nan", "lr"), ("weight_decay=.inf", "weight_decay"), ("max_grad_norm=-1", "max_grad")):
        result = invoke(*base, "--data", good, override)
        assert result.exit_code == 2 and field in result.stderr and no_traceback(result), result.output
    assert not (tmp_path / "run").exists()


def test_yaml_alias_bomb_recipe_is_refused(invoke, tmp_path):
    bomb = 'a: &a ["x","x","x","x","x","x","x","x","x"]\n'
    for level in "bcdefghi":
        bomb += f"{level}: &{level} [" + ",".join(f"*{chr(ord(level) - 1)}" for _ in range(9)) + "]\n"
    recipe = write(tmp_path / "bomb.yaml", bomb + "data: *i\n")
    result = invoke("train", "--config", recipe)
    assert result.exit_code == 2 and "expands to more than" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bomb.yaml"]


def rewrite_metadata(path: Path, key: str, value: str) -> None:
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + length])
    header["__metadata__"][key] = value
    encoded = json.dumps(header).encode()
    encoded += b" " * ((-len(encoded)) % 8)
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + raw[8 + length:])


@pytest.mark.parametrize("value", ["not json", "[1, 2]", '{"model.layers.0.mlp.up_proj": "big"}',
                                   '{"model.layers.0.mlp.up_proj": [4, 4]}'])
def test_malformed_packed_metadata_is_exit_2(invoke, qat, tmp_path, value):
    assert invoke("convert", "-i", qat, "-o", tmp_path / "packed", "--format", "packed").exit_code == 0
    recorded = _recorded(tmp_path / "packed")
    replacement = json.dumps({**recorded, **json.loads(value)}) if value.startswith("{") else value
    rewrite_metadata(tmp_path / "packed" / "model.safetensors", "bitcpm.packed_shapes", replacement)
    before = snapshot(tmp_path)
    result = invoke("convert", "-i", tmp_path / "packed", "-o", tmp_path / "back")
    assert result.exit_code == 2 and "packed" in result.stderr and no_traceback(result), result.output
    assert snapshot(tmp_path) == before


def _recorded(folder: Path) -> dict:
    from bitcpm_cli.core.io.safetensors import safetensors_metadata

    return json.loads(safetensors_metadata(folder / "model.safetensors")["bitcpm.packed_shapes"])


def test_overlapping_safetensors_offsets_are_exit_2(invoke, tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    write(folder / "config.json", {"model_type": "llama"})
    header = json.dumps({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                         "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}).encode()
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 12)
    for args in (("fix-config", folder), ("convert", "-i", folder, "-o", tmp_path / "out", "--quant-type", "ternary")):
        result = invoke(*args)
        assert result.exit_code == 2 and "overlap" in result.stderr and no_traceback(result)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


# ---- accepted nonsense -------------------------------------------------------------------------------------
@pytest.mark.parametrize("flags,message", [
    (("--temperature", "nan"), "--temperature nan"), (("--top-p", "inf"), "--top-p inf"),
    (("--seed", "-1"), "--seed -1"), (("--temperature", "-1", "--max-new-tokens", "0"), "--max-new-tokens 0"),
])
def test_nonsense_sampling_is_refused_before_loading(invoke, model, tmp_path, flags, message):
    result = invoke("infer", "-m", model, "-p", "Hi", "-o", tmp_path / "r.json", *flags)
    assert result.exit_code == 2 and message in result.stderr and not (tmp_path / "r.json").exists()


def test_prompt_longer_than_the_context_is_refused_or_truncated(invoke, model, tmp_path):
    prompts = write(tmp_path / "long.txt", "a" * 100_000 + "\n")  # context: 256 positions
    args = ("infer", "-m", model, "--prompts", prompts, "-o", tmp_path / "r.json", "--device", "cpu",
            "--max-new-tokens", "4", "-q")
    result = invoke(*args)
    assert result.exit_code == 2 and "the model's context is 256" in result.stderr and "--truncate-prompt" in result.stderr
    assert not (tmp_path / "r.json").exists()
    result = invoke(*args, "--truncate-prompt")
    assert result.exit_code == 0, result.output
    document = json.loads((tmp_path / "r.json").read_text())
    assert len(document["results"][0]["prompt_token_ids"]) == 252 and "cut from" in document["notes"][-1]


def test_longrope_factor_that_is_a_string_is_not_accepted(invoke, model, tmp_path):
    import shutil

    folder = tmp_path / "m"
    shutil.copytree(model, folder)
    config = json.loads((folder / "config.json").read_text())
    config["rope_scaling"] = {"rope_type": "longrope", "long_factor": "1.0, 1.0", "short_factor": [1.0] * 8}
    write(folder / "config.json", config)
    result = invoke("fix-config", folder)
    assert result.exit_code == 1 and "long_factor" in result.output and "cannot fix" in result.output


# ---- internal errors ---------------------------------------------------------------------------------------
def test_an_unexpected_exception_is_one_line_and_exit_3(invoke, model, monkeypatch):
    from bitcpm_cli.core.model import config_check

    def broken(*args, **kwargs):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(config_check, "check_config", broken)
    result = invoke("fix-config", model)
    assert result.exit_code == 3
    assert result.stderr.startswith("error: internal error: ZeroDivisionError: division by zero\nhint:")
    assert "--debug" in result.stderr and "Traceback" not in result.output + result.stderr and "╭" not in result.stderr
    debug = invoke("--debug", "fix-config", model)
    assert debug.exit_code == 3 and "Traceback" in debug.stderr


def test_help_lists_the_safety_flags(invoke):
    for command, flags in (("compare", ("--trust-remote-code", "--overwrite")),
                           ("infer", ("--trust-remote-code", "--overwrite", "--truncate-prompt")),
                           ("fix-config", ("--overwrite",)), ("convert", ("--overwrite",))):
        result = invoke(command, "--help")
        assert result.exit_code == 0 and all(flag in result.output for flag in flags), command
