"""Hostile inputs to `train` and `sft` (issue 23): full and read-only output filesystems (real tmpfs mounts), DeepSpeed
configs DeepSpeed rejects, dataset_info.json entries of the wrong shape, a kill between a checkpoint's save and its
completion marker under checkpoint rotation, a 10,000-turn conversation, skipped records' file:line, --list-settings
--json, and the memory plan's parameter count.

Every refusal is exit 2 with one `error:` line naming the file, key or folder, and leaves nothing behind."""

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.helpers import bitcpm_in_process, bitcpm_script, build_tiny_model, small_filesystem
from tests.integration.test_train import RECIPE, ROOT, counting_corpus

SFT_RECIPE = ROOT / "configs" / "sft" / "tiny-cpu.yaml"
NO_DEEPSPEED = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="needs bitcpm[deepspeed]")


def one_error(run: subprocess.CompletedProcess, *pieces: str) -> str:
    """Exit 2, exactly one `error:` line (returned) holding every piece, a `hint:` line last, no traceback."""
    lines = run.stderr.splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert run.returncode == 2, run.stderr[-3000:]
    assert len(errors) == 1 and lines[-1].startswith("hint: ") and "Traceback" not in run.stderr, run.stderr[-3000:]
    assert all(piece in errors[0] for piece in pieces), (pieces, errors[0])
    return errors[0]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    build_tiny_model(root / "float", kind="float")
    counting_corpus(root / "count.txt")
    with (root / "chat.jsonl").open("w") as handle:
        for n in range(40):
            handle.write(json.dumps({"messages": [{"role": "user", "content": f"{n} {n + 1}"},
                                                  {"role": "assistant", "content": "OK, done."}]}) + "\n")
    return root


def train_args(setup, output, *overrides):
    return ("train", "--config", RECIPE, "--model", setup / "float", "--data", setup / "count.txt", "--output-dir",
            output, *overrides)


def sft_args(setup, output, *overrides):
    return ("sft", "--config", SFT_RECIPE, "--model", setup / "float", "--data", setup / "chat.jsonl",
            "--output-dir", output, *overrides)


# ---- item 3: a full or read-only output filesystem (real tmpfs mounts) -------------------------------------------
# checkpoint-2 holds model.safetensors (347 KB, safetensors: SafetensorError "os error 28") and optimizer.pt
# (709 KB, torch.save: a RuntimeError "unexpected pos" with no errno); final/ holds model.safetensors again.
FULL_DISKS = {
    "checkpoint weights (safetensors)": ("200k", "save_steps=2"),
    "checkpoint optimizer (torch.save)": ("600k", "save_steps=2"),
    "final/ (no checkpoint before)": ("200k", "save_steps=100"),
}


@pytest.mark.parametrize("where", list(FULL_DISKS))
def test_train_on_a_full_disk_is_exit_2_naming_the_output_folder(setup, tmp_path, where):
    size, save = FULL_DISKS[where]
    mount = tmp_path / "small"
    run = bitcpm_script(*train_args(setup, mount / "run", "max_steps=2", save),
                        wrap=small_filesystem(mount, size=size))
    one_error(run, "cannot write --output-dir", str(mount / "run"), "No space left on device")
    assert not (mount / "run").exists()  # no complete checkpoint: the folder the run made is gone


def test_train_keeps_its_complete_checkpoint_when_final_does_not_fit(setup, tmp_path):
    """checkpoint-2 fits, final/ does not: exit 2 naming the folder, and the complete checkpoint is kept (the
    folder lives in the mount namespace only, so what is left is listed from inside it)."""
    mount = tmp_path / "small"
    listing = tmp_path / "listing.txt"
    wrap = small_filesystem(mount, size="1400k")
    wrap[4] = wrap[4].replace('&& exec "$@"', f'&& "$@"; code=$?; ls -A "{mount}/run" > "{listing}"; exit $code')
    run = bitcpm_script(*train_args(setup, mount / "run", "max_steps=2", "save_steps=2"), wrap=wrap)
    one_error(run, "cannot write --output-dir", str(mount / "run"), "No space left on device")
    assert "what it held that is complete is kept" in run.stderr.splitlines()[-1]
    left = listing.read_text().split()
    assert "checkpoint-2" in left and "final" not in left and ".final.tmp" not in left, left


def test_sft_on_a_full_disk_is_exit_2_naming_the_output_folder(setup, tmp_path):
    mount = tmp_path / "small"
    run = bitcpm_script(*sft_args(setup, mount / "run", "max_steps=2", "save_steps=2"),
                        wrap=small_filesystem(mount, size="200k"))
    one_error(run, "cannot write --output-dir", str(mount / "run"), "No space left on device")


@pytest.mark.parametrize("command", ["train", "sft"])
@pytest.mark.parametrize("inside", [True, False], ids=["folder-in-read-only-fs", "read-only-fs-itself"])
def test_read_only_output_location_is_exit_2(setup, tmp_path, command, inside):
    mount = tmp_path / "ro"
    output = mount / "run" if inside else mount
    arguments = (train_args if command == "train" else sft_args)(setup, output, "max_steps=2", "save_steps=2")
    run = bitcpm_script(*arguments, wrap=small_filesystem(mount, read_only=True))
    error = one_error(run, "cannot write --output-dir", str(output))
    assert "read-only file system" in error.lower(), error


# ---- item 5: DeepSpeed configs DeepSpeed rejects -------------------------------------------------------------------
DEEPSPEED_CONFIGS = {
    "micro batch contradicts the recipe": ({"train_micro_batch_size_per_gpu": 8}, "train_micro_batch_size_per_gpu"),
    "non-numeric micro batch": ({"train_micro_batch_size_per_gpu": "eight"}, "train_micro_batch_size_per_gpu"),
    "accumulation contradicts the recipe": ({"gradient_accumulation_steps": 3}, "gradient_accumulation_steps"),
    "train_batch_size contradicts the recipe": ({"train_batch_size": 5}, "train_batch_size"),
    "optimizer DeepSpeed cannot build": ({"optimizer": {"type": "NoSuchOptimizer"}}, "optimizer.type"),
    "optimizer not an object": ({"optimizer": 5}, "optimizer"),
    "optimizer params not an object": ({"optimizer": {"type": "AdamW", "params": [1]}}, "optimizer.params"),
    "unknown ZeRO key": ({"zero_optimization": {"stage": 2, "no_such_key": 1}}, "no_such_key"),
    "no batch size at all": ({"train_micro_batch_size_per_gpu": None}, "train_micro_batch_size_per_gpu"),
}


@NO_DEEPSPEED
@pytest.mark.parametrize("case", list(DEEPSPEED_CONFIGS))
def test_deepspeed_config_deepspeed_rejects_is_exit_2_before_anything_is_written(setup, tmp_path, case, invoke):
    values, key = DEEPSPEED_CONFIGS[case]
    config = json.loads((ROOT / "configs" / "deepspeed" / "zero2.json").read_text())
    for name, value in values.items():
        if value is None:
            config.pop(name)
        else:
            config[name] = value
    if key == "train_micro_batch_size_per_gpu" and values[key] is None:
        config.pop("train_batch_size")
    (tmp_path / "ds.json").write_text(json.dumps(config))
    before = (tmp_path / "ds.json").read_bytes()
    result = invoke(*train_args(setup, tmp_path / "run", "max_steps=2", f"deepspeed={tmp_path / 'ds.json'}"))
    assert result.exit_code == 2, result.output[-3000:]
    first = next(line for line in result.output.splitlines() if line.startswith("error:"))
    assert "deepspeed" in first and key in first, first
    assert not (tmp_path / "run").exists() and (tmp_path / "ds.json").read_bytes() == before


@NO_DEEPSPEED
@pytest.mark.parametrize("shipped", ["zero2", "zero3"])
def test_the_shipped_deepspeed_configs_pass_the_check(setup, tmp_path, shipped):
    import torch

    from bitcpm_cli.core.training.distributed import check_deepspeed_config, choose_strategy
    from bitcpm_cli.core.training.recipe import TrainConfig, resolve_config
    from bitcpm_cli.core.training.train import training_arguments

    path = ROOT / "configs" / "deepspeed" / f"{shipped}.json"
    for extra in ([], ["bf16=true"], ["grad_accum=4", "batch_size=2"]):
        given = {"model": str(setup / "float"), "data": [str(setup / "count.txt")], "output_dir": str(tmp_path / "run")}
        recipe = resolve_config(TrainConfig, RECIPE, given, [f"deepspeed={path}", *extra])
        strategy = choose_strategy(recipe.deepspeed, recipe.training_args, [])
        arguments = training_arguments(recipe, tmp_path / "run", torch.device("cpu"), strategy)
        check_deepspeed_config(arguments, str(path))


@NO_DEEPSPEED
def test_deepspeed_contradiction_through_the_installed_script(setup, tmp_path):
    config = json.loads((ROOT / "configs" / "deepspeed" / "zero2.json").read_text())
    config["train_micro_batch_size_per_gpu"] = 8
    (tmp_path / "ds.json").write_text(json.dumps(config))
    run = bitcpm_script(*train_args(setup, tmp_path / "run", "max_steps=2"), "--deepspeed", tmp_path / "ds.json")
    one_error(run, "deepspeed: train_micro_batch_size_per_gpu is 8", "per_device_train_batch_size makes it 4")
    assert not (tmp_path / "run").exists()


@NO_DEEPSPEED
def test_deepspeed_without_a_launcher_trains_one_process(setup, tmp_path):
    """`bitcpm train --deepspeed` without torchrun: DeepSpeed would ask MPI (mpi4py) for its rank and die (exit 3);
    bitcpm sets up the one-process group a launcher would, and says so."""
    run = bitcpm_script(*train_args(setup, tmp_path / "run", "max_steps=2", "save_steps=2"), "--deepspeed",
                        ROOT / "configs" / "deepspeed" / "zero2.json",
                        unset=("BITCPM_DEBUG", "RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))
    assert run.returncode == 0, run.stderr[-3000:]
    assert "note: DeepSpeed without a launcher: one process, RANK=0, " in run.stdout
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()


# ---- item 5: dataset_info.json entries of the wrong shape ------------------------------------------------------------
BAD_ENTRIES = {
    "columns a list": ({"file_name": "chat.jsonl", "columns": ["messages"]}, "columns must be an object"),
    "columns values not strings": ({"file_name": "chat.jsonl", "columns": {"messages": 3}}, "columns must be"),
    "tags a string": ({"file_name": "chat.jsonl", "formatting": "sharegpt", "tags": "role"}, "tags must be"),
    "formatting a number": ({"file_name": "chat.jsonl", "formatting": 2}, "formatting must be a string"),
    "file_name a list": ({"file_name": ["chat.jsonl"]}, "file_name must be a file name"),
}


@pytest.mark.parametrize("case", list(BAD_ENTRIES))
def test_dataset_info_entry_of_the_wrong_shape_is_exit_2_naming_it(setup, tmp_path, case):
    entry, message = BAD_ENTRIES[case]
    info = tmp_path / "dataset_info.json"
    info.write_text(json.dumps({"my_chat": entry, "other": {"file_name": "chat.jsonl"}}))
    run = bitcpm_in_process(*sft_args(setup, tmp_path / "run"), "--columns", info, "--preview", "1")
    one_error(run, message)
    error = one_error(run, "columns:")
    assert "my_chat" in error and str(info) in error, error
    assert not (tmp_path / "run").exists()


# ---- item 13: rotation never removes the last complete checkpoint ----------------------------------------------------
KILLED_BEFORE_THE_MARKER = textwrap.dedent("""
    import os, sys
    from bitcpm_cli.core.training import callbacks
    from bitcpm_cli.core.training.recipe import TrainConfig, resolve_config
    from bitcpm_cli.core.training.train import train

    marked = callbacks.CompletionMarker.on_save

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == 10:  # checkpoint-10 is saved, not yet marked complete: the kill comes now
            os._exit(9)
        return marked(self, args, state, control, **kwargs)

    callbacks.CompletionMarker.on_save = on_save
    model, data, output = sys.argv[1:4]
    config = resolve_config(TrainConfig, {recipe!r}, {{"model": model, "data": [data], "output_dir": output}},
                            ["max_steps=20", "save_steps=5", "logging_steps=5", "save_total_limit=1"])
    train(config)
""")


def test_a_kill_between_save_and_marker_keeps_the_previous_complete_checkpoint(setup, tmp_path):
    from bitcpm_cli.core.training.callbacks import COMPLETE_MARKER
    from bitcpm_cli.core.training.train import latest_complete_checkpoint

    output = tmp_path / "run"
    killed = subprocess.run([sys.executable, "-c", KILLED_BEFORE_THE_MARKER.format(recipe=str(RECIPE)),
                             setup / "float", setup / "count.txt", output], cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "DS_ACCELERATOR": "cpu"})
    assert killed.returncode == 9, killed.stderr[-3000:]
    assert (output / "checkpoint-10").is_dir() and not (output / "checkpoint-10" / COMPLETE_MARKER).exists()
    assert latest_complete_checkpoint(output) == output / "checkpoint-5"  # the Trainer used to delete it already
    resumed = bitcpm_script(*train_args(setup, output, "max_steps=20", "save_steps=5", "logging_steps=5",
                                        "save_total_limit=1"), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from checkpoint-5" in resumed.stdout and "removed the half-written checkpoint-10" in resumed.stdout
    assert sorted(p.name for p in output.glob("checkpoint-*")) == ["checkpoint-20"]  # rotation still keeps 1


def test_rotation_keeps_the_newest_complete_checkpoints_only(tmp_path):
    from bitcpm_cli.core.training.callbacks import COMPLETE_MARKER, rotate_checkpoints

    for step in (5, 10, 15, 20):
        (tmp_path / f"checkpoint-{step}").mkdir()
        if step != 15:
            (tmp_path / f"checkpoint-{step}" / COMPLETE_MARKER).write_text("{}")
    removed = rotate_checkpoints(tmp_path, 2, 20)
    assert [p.name for p in removed] == ["checkpoint-5"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-10", "checkpoint-15", "checkpoint-20"]
    assert rotate_checkpoints(tmp_path, None, 20) == []


# ---- item 11: a very long conversation renders only up to --max-length --------------------------------------------
def counting_tokenizer(folder):
    from bitcpm_cli.core.model.hf import load_tokenizer
    from bitcpm_cli.core.training.sft import setup_chat_tokenizer

    tokenizer = load_tokenizer(folder, False)
    setup_chat_tokenizer(tokenizer, "chatml")
    calls = []
    real = tokenizer.apply_chat_template

    def counted(messages, *args, **kwargs):
        calls.append(len(messages))
        return real(messages, *args, **kwargs)

    tokenizer.apply_chat_template = counted
    return tokenizer, calls


def conversation(turns: int) -> list[dict]:
    return [{"role": "user" if k % 2 == 0 else "assistant", "content": f"{k} {k + 1} {k + 2}"} for k in range(turns)]


def test_a_10000_turn_conversation_renders_a_bounded_number_of_prefixes(setup):
    from bitcpm_cli.core.training.sft import encode_conversation

    tokenizer, calls = counting_tokenizer(setup / "float")
    example = encode_conversation(tokenizer, conversation(10_000), max_length=256)
    rendered_turns = sum(calls) - 10_000  # the whole conversation is rendered once, to be tokenized
    assert len(calls) < 40 and rendered_turns < 400, (len(calls), rendered_turns)  # was 10,000 renders, 50 M turns
    assert example.turns_cut > 9_900 and example.supervised > 0


def test_the_cut_changes_nothing_training_sees(setup):
    """The first max_length tokens and labels are those of the full encoding; short conversations are identical."""
    from bitcpm_cli.core.training.sft import encode_conversation

    tokenizer, _ = counting_tokenizer(setup / "float")
    for turns, max_length in ((200, 128), (200, 301), (6, 512), (2, 2)):
        full = encode_conversation(tokenizer, conversation(turns))
        cut = encode_conversation(tokenizer, conversation(turns), max_length=max_length)
        assert cut.input_ids == full.input_ids
        assert cut.labels[:max_length] == full.labels[:max_length], (turns, max_length)
        if len(full.input_ids) <= max_length:
            assert cut.labels == full.labels and cut.turns_cut == 0


def test_sft_preview_of_a_10000_turn_conversation_notes_the_turns_cut(setup, tmp_path):
    data = tmp_path / "long.jsonl"
    data.write_text(json.dumps({"messages": conversation(10_000)}) + "\n")
    run = bitcpm_in_process("sft", "--model", setup / "float", "--data", data, "--max-length", "128", "--preview",
                            "1", "--json")
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout)
    assert report["examples"][0]["tokens"] == 128 and report["summary"]["turns_cut"] > 9_900
    assert any("lie past max_length 128 tokens" in note for note in report["summary"]["notes"])


# ---- item 14: skipped records say file:line; the memory plan's units -----------------------------------------------
def test_every_skipped_alpaca_record_is_named_by_file_and_line(setup, tmp_path):
    records = [{"instruction": "add 1 2", "input": "", "output": "3"} for _ in range(14)]
    for index in (2, 5, 7, 8, 9, 10, 11, 12, 13, 1, 4):  # 11 abnormal: history is not [prompt, response] pairs
        records[index]["history"] = "not pairs"
    data = tmp_path / "alpaca.json"
    data.write_text("[\n" + ",\n".join(json.dumps(r, indent=2) for r in records) + "\n]\n")
    lines = data.read_text().splitlines()
    starts = [number for number, line in enumerate(lines, 1) if line == "{"]
    run = bitcpm_in_process("sft", "--model", setup / "float", "--data", data, "--preview", "1", "--json")
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads(run.stdout)["summary"]
    bad = sorted((1, 2, 4, 5, 7, 8, 9, 10, 11, 12, 13))
    assert summary["skipped_abnormal"] == 11
    assert summary["skipped_records"] == [f"{data}:{starts[i]}: history must be a list of [prompt, response] pairs"
                                          for i in bad]
    notes = summary["notes"]
    assert sum(note.startswith("skipped: ") for note in notes) == 10
    assert any("1 more skipped record(s)" in note for note in notes)


def test_memory_plan_counts_parameters_in_human_units(setup):
    from bitcpm_cli.core.training.memory_plan import human_count

    assert [human_count(n) for n in (950, 86_336, 2_620_000, 1_240_000_000)] == ["950", "86.34 K", "2.62 M",
                                                                                  "1.24 B"]
    run = bitcpm_in_process(*train_args(setup, Path("/nonexistent-parent/never"), "max_steps=1",
                                        "max_memory_gb=0.000001"))
    assert "0.00 B parameters" not in run.stderr
    assert " K parameters)" in run.stderr, run.stderr[-2000:]


# ---- item 8: --list-settings --json ---------------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["train", "sft"])
def test_list_settings_json_is_json(command):
    run = bitcpm_in_process(command, "--list-settings", "--json")  # through the script: test_json_stdout.py
    assert run.returncode == 0, run.stderr
    rows = json.loads(run.stdout)
    names = {row["name"]: row for row in rows}
    assert names["max_steps"]["source"] == "bitcpm" and "learning_rate" in names["lr"]["aliases"]
    assert names["save_total_limit"]["default"] == 3 and "fsdp" in names
    if command == "sft":
        assert names["max_length"]["default"] == 512


# ---- fuzz: hostile shapes, each an InputError / ConfigError (exit 2) or accepted, never anything else -------------
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

JSON_LEAVES = st.one_of(st.none(), st.booleans(), st.integers(-10, 10**6), st.floats(allow_nan=False),
                        st.text(max_size=8), st.sampled_from(["auto", "AdamW", "WarmupLR", "chat.jsonl", "sharegpt"]))
JSON_VALUES = st.recursive(
    JSON_LEAVES, lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner,
                                                                                      max_size=3)), max_leaves=6)
FUZZ = settings(max_examples=50, deadline=None, database=None, suppress_health_check=list(HealthCheck))


@FUZZ
@given(entry=st.dictionaries(st.sampled_from(["file_name", "formatting", "columns", "tags", "ranking", "file_sha1"]),
                             st.one_of(JSON_VALUES, st.dictionaries(
                                 st.sampled_from(["messages", "prompt", "role_tag", "images", "bogus"]), JSON_VALUES,
                                 max_size=3)), max_size=5),
       shared=st.booleans())
def test_fuzz_dataset_info_entries(tmp_path_factory, entry, shared):
    """Any dataset_info.json entry: a mapping bitcpm can use, or an InputError; never another exception."""
    from bitcpm_cli.core.errors import InputError
    from bitcpm_cli.core.training.chatdata import parse_columns

    info = tmp_path_factory.mktemp("info") / "dataset_info.json"
    info.write_text(json.dumps(entry if shared else {"mine": entry}))
    try:
        mappings = parse_columns([str(info)], ["chat.jsonl"])
    except InputError as exc:
        assert exc.message.startswith("columns: ")
        return
    mapping = mappings["chat.jsonl"]
    assert all(isinstance(v, str) for v in {**mapping.columns, **mapping.tags}.values())
    assert mapping.formatting in (None, "alpaca", "sharegpt", "openai")


DS_KEYS = ["train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size", "gradient_clipping",
           "optimizer", "scheduler", "bf16", "fp16", "zero_optimization", "steps_per_print", "checkpoint"]


@NO_DEEPSPEED
@FUZZ
@given(values=st.dictionaries(st.sampled_from(DS_KEYS), JSON_VALUES, max_size=4),
       stage=st.sampled_from([0, 1, 2, 3]))
def test_fuzz_deepspeed_configs(setup, tmp_path_factory, values, stage):
    """Any DeepSpeed config: accepted by transformers' and DeepSpeed's own checks, or a ConfigError; never another
    exception (which would be exit 3)."""
    import torch

    from bitcpm_cli.core.errors import BitcpmError
    from bitcpm_cli.core.training.distributed import check_deepspeed_config, choose_strategy
    from bitcpm_cli.core.training.recipe import TrainConfig, resolve_config
    from bitcpm_cli.core.training.train import training_arguments

    folder = tmp_path_factory.mktemp("ds")
    config = {"zero_optimization": {"stage": stage}, "train_micro_batch_size_per_gpu": "auto", **values}
    (folder / "ds.json").write_text(json.dumps(config))
    recipe = resolve_config(TrainConfig, RECIPE, {"model": str(setup / "float"), "data": [str(setup / "count.txt")],
                                                  "output_dir": str(folder / "run")},
                            [f"deepspeed={folder / 'ds.json'}"])
    try:
        strategy = choose_strategy(recipe.deepspeed, recipe.training_args, [])
        args = training_arguments(recipe, folder / "run", torch.device("cpu"), strategy)
        check_deepspeed_config(args, str(folder / "ds.json"))
    except BitcpmError as exc:
        assert exc.message.startswith("deepspeed") or "training settings" in exc.message, exc.message


@FUZZ
@given(records=st.lists(JSON_VALUES, max_size=8), indent=st.sampled_from([None, 0, 2]))
def test_fuzz_json_list_lines(records, indent):
    """The line each element of a .json list starts on, however the list is laid out."""
    from bitcpm_cli.core.training.chatdata import json_list_lines

    text, expected = "[", []
    for index, record in enumerate(records):
        text += ("," if index else "") + "\n  "
        expected.append(text.count("\n") + 1)
        text += json.dumps(record, indent=indent)
    text += "\n]\n"
    assert json.loads(text) == records and json_list_lines(text) == expected


@FUZZ
@given(turns=st.lists(st.text(alphabet="abc 123\n", max_size=12), min_size=1, max_size=24),
       max_length=st.integers(2, 200), system=st.booleans())
def test_fuzz_prefix_cut_keeps_what_training_sees(setup, turns, max_length, system):
    """encode_conversation with max_length: the first max_length tokens and labels equal the uncut encoding's."""
    from bitcpm_cli.core.training.sft import encode_conversation

    tokenizer, _ = counting_tokenizer(setup / "float")
    messages = ([{"role": "system", "content": "be brief"}] if system else []) + [
        {"role": "user" if k % 2 == 0 else "assistant", "content": text} for k, text in enumerate(turns)]
    full = encode_conversation(tokenizer, messages)
    cut = encode_conversation(tokenizer, messages, max_length=max_length)
    if full is None:
        assert cut is None
        return
    assert cut.input_ids == full.input_ids and cut.labels[:max_length] == full.labels[:max_length]
