"""Issue #23 items 1, 3 and 10: outputs that are special files are refused; a read-only or full destination is
exit 2 in every command, on a real file system (a tmpfs mounted in a private mount namespace, see
tests.helpers.small_filesystem); a failure cleans up by the paths resolved at the start."""

from __future__ import annotations

import json
import os
import socket
import stat
from pathlib import Path

import pytest

from tests.fuzz.hostile import snapshot
from tests.helpers import bitcpm_in_process, bitcpm_script, small_filesystem

ROOT = Path(__file__).resolve().parents[2]
CORPUS = ROOT / "configs" / "quickstart" / "corpus.txt"


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A tiny QAT model (with the SentencePiece-style tokenizer GGUF export takes) and two results files."""
    from tests.integration.test_gguf import qat_model

    root = tmp_path_factory.mktemp("outputs")
    qat_model(root / "qat", group_size=-1)
    run = bitcpm_in_process("infer", "-m", root / "qat", "-p", "Hello", "-o", root / "a.json", "--device", "cpu",
                            "--max-new-tokens", "4")
    assert run.returncode == 0, run.stderr
    (root / "b.json").write_bytes((root / "a.json").read_bytes())
    return root


def commands(work: Path, output: Path) -> dict[str, list]:
    """Every command that writes, with `output` as what it writes."""
    model = work / "qat"
    return {
        "fix-config": ["fix-config", model, "--output", output],
        "convert": ["convert", "-i", model, "-o", output],
        "convert-packed": ["convert", "-i", model, "-o", output, "--format", "packed"],
        "convert-gguf": ["convert", "-i", model, "-o", output, "--format", "gguf", "--gguf-type", "auto"],
        "infer": ["infer", "-m", model, "-p", "Hi", "-o", output, "--device", "cpu", "--max-new-tokens", "2"],
        "compare": ["compare", work / "a.json", work / "b.json", "--output", output],
        "eval": ["eval", "-m", model, "--data", CORPUS, "-o", output, "--context", "32", "--max-tokens", "64",
                 "--device", "cpu"],
        "quickstart": ["quickstart", "--output-dir", output],
    }


def one_error(run, start: str) -> None:
    lines = run.stderr.splitlines()
    assert run.returncode == 2, run.stderr
    assert lines[0].startswith(f"error: {start}") and lines[-1].startswith("hint: "), run.stderr
    assert sum(line.startswith("error:") for line in lines) == 1 and "Traceback" not in run.stderr


def make_special(path: Path, kind: str) -> None:
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "socket":
        server = socket.socket(socket.AF_UNIX)
        server.bind(str(path))
        server.close()  # the socket file stays
    elif kind == "chardev":
        if os.geteuid() != 0:
            pytest.skip("creating a character device node needs root")
        os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(1, 3))  # a private copy of /dev/null's node


KIND_CHECK = {"fifo": stat.S_ISFIFO, "socket": stat.S_ISSOCK, "chardev": stat.S_ISCHR}
KIND_WORDS = {"fifo": "a FIFO", "socket": "a socket", "chardev": "a character device"}


# ---- item 1: special files -------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["fifo", "socket", "chardev"])
@pytest.mark.parametrize("command", ["fix-config", "convert", "convert-gguf", "infer", "compare", "eval",
                                     "quickstart"])
def test_an_output_that_is_a_special_file_is_refused_and_kept(invoke, work, tmp_path, command, kind):
    target = tmp_path / ("out.gguf" if command == "convert-gguf" else "out")
    make_special(target, kind)
    before = snapshot(work / "qat")
    overwrite = [] if command == "quickstart" else ["--overwrite"]  # quickstart always replaces its own folder
    result = invoke(*map(str, commands(work, target)[command]), *overwrite)
    assert result.exit_code == 2, result.output
    assert f"is {KIND_WORDS[kind]}, not a " in result.stderr and "Traceback" not in result.stderr
    assert KIND_CHECK[kind](os.lstat(target).st_mode)  # still the special file, not replaced
    assert os.listdir(tmp_path) == [target.name] and snapshot(work / "qat") == before


def test_a_link_to_a_device_is_refused_through_the_installed_script(work, tmp_path):
    link = tmp_path / "null.json"
    link.symlink_to("/dev/null")
    run = bitcpm_script("fix-config", work / "qat", "--output", link, "--overwrite")
    one_error(run, "--output is a character device, not a regular file")
    assert link.is_symlink() and os.readlink(link) == "/dev/null" and stat.S_ISCHR(os.stat("/dev/null").st_mode)


# ---- item 3: read-only and full file systems, for real ---------------------------------------------------------
@pytest.mark.parametrize("command", ["fix-config", "convert", "convert-packed", "convert-gguf", "infer", "compare",
                                     "eval", "quickstart"])
def test_a_read_only_destination_is_exit_2_before_any_work(work, tmp_path, command):
    mount = tmp_path / "ro"
    wrap = small_filesystem(mount, read_only=True)
    before = snapshot(work)
    output = mount / ("out.gguf" if command == "convert-gguf" else "out")
    run = bitcpm_script(*commands(work, output)[command], wrap=wrap)
    one_error(run, f"cannot write --output{'-dir' if command == 'quickstart' else ''} {output}: ")
    assert "is not writable (read-only file system or no permission)" in run.stderr
    assert snapshot(work) == before and os.listdir(mount) == []  # the mount point, outside the namespace


@pytest.mark.parametrize("command", ["convert", "convert-packed", "convert-gguf", "infer", "eval"])
def test_a_full_destination_is_exit_2_with_nothing_left(work, tmp_path, command):
    mount = tmp_path / "full"
    # one page: room for the claim, none for the output; the listing runs inside the namespace, where the tmpfs is
    listing = tmp_path / "left.txt"
    output = mount / ("out.gguf" if command == "convert-gguf" else "out")
    run = bitcpm_script(*commands(work, output)[command], wrap=small_filesystem(mount, "4k", listing=listing))
    if command in ("infer", "eval") and run.returncode == 0:
        pytest.fail(f"{command} fitted its output into 4k; the test needs a larger output")
    one_error(run, f"cannot write --output {output}: No space left on device")
    assert listing.read_text() == ""  # nothing left on the full file system: no claim, no staging


# ---- item 10: cleanup by the paths resolved at the start -------------------------------------------------------
def test_a_parent_retargeted_mid_run_leaves_nothing_in_either_folder(invoke, work, tmp_path, monkeypatch):
    from bitcpm_cli.core.io import safetensors

    first, second, link = tmp_path / "first", tmp_path / "second", tmp_path / "link"
    first.mkdir()
    second.mkdir()
    link.symlink_to(first)
    original = safetensors.SafetensorsStreamWriter.write

    def retarget_then_fail(self, name, tensor):
        original(self, name, tensor)
        link.unlink()
        link.symlink_to(second)  # the output's parent now points elsewhere
        raise OSError(28, os.strerror(28))

    monkeypatch.setattr(safetensors.SafetensorsStreamWriter, "write", retarget_then_fail)
    result = invoke("convert", "-i", str(work / "qat"), "-o", str(link / "fused"))
    assert result.exit_code == 2 and "No space left on device" in result.stderr, result.output
    assert os.listdir(first) == [] and os.listdir(second) == []


def test_results_with_positive_logprobs_or_misaligned_steps_are_refused(invoke, work, tmp_path):
    document = json.loads((work / "a.json").read_text())
    run = bitcpm_in_process("infer", "-m", work / "qat", "-p", "Hello", "-o", tmp_path / "k.json", "--device", "cpu",
                            "--max-new-tokens", "4", "--logprobs", "2")
    assert run.returncode == 0, run.stderr
    document = json.loads((tmp_path / "k.json").read_text())
    positive = json.loads(json.dumps(document))
    positive["results"][0]["top_logprobs"][0][0][1] = 0.5
    (tmp_path / "positive.json").write_text(json.dumps(positive))
    short = json.loads(json.dumps(document))
    short["results"][0]["top_logprobs"].pop()
    (tmp_path / "short.json").write_text(json.dumps(short))
    for name, message in (("positive", "logprob 0.5 is above 0"), ("short", "step(s) for")):
        result = invoke("compare", str(tmp_path / f"{name}.json"), str(tmp_path / "k.json"))
        assert result.exit_code == 2 and message in result.stderr, result.output


@pytest.mark.parametrize("margin", ["nan", "-1", "inf"])
def test_compare_refuses_a_tie_margin_that_is_not_a_margin(invoke, work, margin):
    result = invoke("compare", str(work / "a.json"), str(work / "b.json"), "--tie-margin", margin)
    assert result.exit_code == 2 and "--tie-margin" in result.stderr and "must be a finite number" in result.stderr


# ---- item 14: a FIFO or device as an input is named as such, never "not found", never opened -------------------
def test_a_fifo_as_prompts_or_shard_is_named_and_never_opened(invoke, work, tmp_path):
    import shutil

    fifo = tmp_path / "prompts.txt"
    os.mkfifo(fifo)  # opening it would block: the test would hang
    result = invoke("infer", "-m", str(work / "qat"), "--prompts", str(fifo), "-o", str(tmp_path / "r.json"))
    assert result.exit_code == 2 and f"prompts file is a FIFO, not a regular file ({fifo})" in result.stderr
    model = tmp_path / "sharded"
    shutil.copytree(work / "qat", model)
    weights = model / "model.safetensors"
    names = json.loads(weights.read_bytes()[8:8 + int.from_bytes(weights.read_bytes()[:8], "little")])
    index = {"metadata": {}, "weight_map": {name: "model-00001-of-00001.safetensors" for name in names
                                            if name != "__metadata__"}}
    weights.unlink()
    os.mkfifo(model / "model-00001-of-00001.safetensors")
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    result = invoke("fix-config", str(model))
    assert result.exit_code == 2, result.output
    assert "shard model-00001-of-00001.safetensors is a FIFO, not a regular file" in result.stderr
    assert "missing" not in result.stderr


@pytest.mark.parametrize("command", ["train", "sft", "eval"])
def test_a_fifo_or_device_as_data_is_named_and_never_opened(invoke, work, tmp_path, command):
    fifo = tmp_path / ("data.jsonl" if command == "sft" else "data.txt")
    os.mkfifo(fifo)
    for data, kind in ((fifo, "a FIFO"), (Path("/dev/zero"), "a character device")):
        args = {"train": ["train", "--config", str(ROOT / "configs" / "pretrain" / "tiny-cpu.yaml")],
                "sft": ["sft", "--config", str(ROOT / "configs" / "sft" / "tiny-cpu.yaml")],
                "eval": ["eval"]}[command]
        args += ["--model" if command != "eval" else "-m", str(work / "qat"), "--data", str(data)]
        args += ["--output-dir", str(tmp_path / "run")] if command != "eval" else ["--device", "cpu"]
        result = invoke(*args)
        assert result.exit_code == 2, result.output
        assert f"data file is {kind}, not a regular file ({data})" in result.stderr, result.stderr
        assert "not found" not in result.stderr and not (tmp_path / "run").exists()


# ---- from the hostile review: devices as JSON inputs, --json with closed streams, loops, files as folders ---------
def test_a_device_or_fifo_as_a_json_input_is_refused_unopened(invoke, work, tmp_path):
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    for results in (Path("/dev/zero"), fifo):  # /dev/zero would be read forever, the FIFO would block
        result = invoke("compare", str(results), str(work / "a.json"))
        assert result.exit_code == 2 and "results file is a" in result.stderr, result.output
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").symlink_to("/dev/zero")
    result = invoke("fix-config", str(model))
    assert result.exit_code == 2 and "config.json is a character device, not a regular file" in result.stderr


def test_json_survives_closed_streams_and_json_as_an_option_value(work, tmp_path):
    import subprocess
    import sys

    script = Path(sys.executable).parent / "bitcpm"
    a = work / "a.json"
    closed_stderr = subprocess.run(f'"{script}" compare "{a}" "{a}" --json 2>&-', shell=True, capture_output=False,
                                   stdout=subprocess.PIPE, text=True, timeout=300)
    assert closed_stderr.returncode == 0 and json.loads(closed_stderr.stdout)["ok"] is True
    closed_stdout = subprocess.run(f'"{script}" compare "{a}" "{a}" --json >&-', shell=True, stderr=subprocess.PIPE,
                                   text=True, timeout=300)
    assert closed_stdout.returncode == 0 and "Traceback" not in closed_stdout.stderr
    value = bitcpm_script("compare", a, a, "-o", tmp_path / "--json")  # --json here names a file
    assert value.returncode == 0 and "matched by" in value.stdout and (tmp_path / "--json").is_file()


def test_a_symlink_loop_or_a_file_as_a_folder_is_exit_2(invoke, work, tmp_path):
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    (tmp_path / "plain.txt").write_text("x")
    for output, message in ((loop, "a symbolic link in this path points back into itself"),
                            (loop / "r.json", "points back into itself")):
        result = invoke("compare", str(work / "a.json"), str(work / "b.json"), "-o", str(output))
        assert result.exit_code == 2 and message in result.output, result.output
    # an output folder created with its parents (train, sft, quickstart) under a regular file: ENOTDIR was exit 3
    result = invoke("quickstart", "--output-dir", str(tmp_path / "plain.txt" / "run"))
    assert result.exit_code == 2 and "plain.txt is a file, not a folder" in result.output, result.output
    assert (tmp_path / "plain.txt").read_text() == "x"
