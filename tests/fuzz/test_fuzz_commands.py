"""Fuzz every command that takes files, through the CLI, with generated malformed and adversarial inputs.

Invariants for every run: the exit code is 0, 1 or 2 (never 3, never a crash), no traceback is printed, nothing is
written when the command fails, every input is byte-identical afterwards. Bounded (a few dozen examples a command,
no deadline) so the suite stays in the default run.
"""

import json
import struct
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from bitcpm_cli.cli.app import app
from tests.fuzz.hostile import snapshot
from tests.fuzz.test_fuzz_readers import json_values, mangled_json, yaml_text
from tests.helpers import build_tiny_model, llama_shapes, write_model_dir

BOUNDED = settings(max_examples=25, deadline=None, database=None,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
RUNNER = CliRunner()
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("fuzz") / "fused")


def run(*args, inputs: Path, output: Path | None = None, input_text: str | None = None):
    """Run one command on the files under `inputs` and assert the invariants; returns the result."""
    before = snapshot(inputs)
    result = RUNNER.invoke(app, [str(a) for a in args], input=input_text)
    text = result.output + (result.stderr or "")
    assert result.exit_code in (0, 1, 2), (args, text, result.exception)
    assert "Traceback" not in text and "internal error" not in text, text
    assert snapshot(inputs) == before, "an input changed"
    if output is not None:
        assert not [p.name for p in output.parent.iterdir() if p.name.startswith(".bitcpm-")], "staging left behind"
    if result.exit_code == 2 and output is not None:
        assert not output.exists(), "a failed run wrote its output"
    if result.exit_code == 2:
        assert text.lstrip().startswith("error:") or "Usage:" in text, text
    return result


def file_bytes(strategy):
    return st.one_of(strategy.map(str.encode), st.binary(max_size=120))


SMALL = dict(hidden=32, layers=1, heads=2, kv_heads=1, head_dim=16, intermediate=64, vocab=64)
BASE_CONFIG = {"model_type": "llama", "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
               "num_key_value_heads": 1, "head_dim": 16, "intermediate_size": 64, "vocab_size": 64,
               "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
config_values = st.one_of(mangled_json(), st.dictionaries(st.sampled_from(
    list(BASE_CONFIG) + ["rope_scaling", "partial_rotary_factor", "rope_parameters"]), json_values, max_size=5).map(
    lambda d: json.dumps({**BASE_CONFIG, **d})))


@BOUNDED
@given(config_values, st.sampled_from(["fix-config", "fix-config --write", "convert"]))
def test_fix_config_and_convert_with_any_config(text, command):
    with tempfile.TemporaryDirectory() as root:
        folder = write_model_dir(Path(root) / "in" / "m", BASE_CONFIG, llama_shapes(**SMALL))
        (folder / "config.json").write_text(text)
        name, *flags = command.split()
        if name == "convert":
            out = Path(root) / "out"
            run("convert", "-i", folder, "-o", out, "--quant-type", "ternary", inputs=Path(root) / "in", output=out)
        elif flags:
            before = snapshot(folder)
            result = RUNNER.invoke(app, ["fix-config", str(folder), "--write"])
            assert result.exit_code in (0, 1, 2) and "Traceback" not in result.output
            if result.exit_code == 2:
                assert snapshot(folder) == before
        else:
            run("fix-config", folder, inputs=Path(root) / "in")


index_values = st.one_of(
    mangled_json(),
    st.dictionaries(st.just("weight_map"), st.dictionaries(
        st.sampled_from(["model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"]),
        st.one_of(st.sampled_from(["model.safetensors", "../out/model.safetensors", "/etc/passwd", "link.safetensors",
                                   "", ".", "sub/../model.safetensors", "model.safetensors\x00"]), json_values),
        max_size=3)).map(json.dumps),
)


@BOUNDED
@given(index_values)
def test_any_shard_index(text):
    with tempfile.TemporaryDirectory() as root:
        folder = write_model_dir(Path(root) / "in" / "m", BASE_CONFIG, llama_shapes(**SMALL))
        (Path(root) / "elsewhere").mkdir()
        (Path(root) / "elsewhere" / "x").write_text("outside")
        (folder / "link.safetensors").symlink_to(Path(root) / "elsewhere" / "x")
        (folder / "model.safetensors.index.json").write_text(text)
        run("fix-config", folder, inputs=Path(root) / "in")
        out = Path(root) / "out"
        run("convert", "-i", folder, "-o", out, "--quant-type", "ternary", inputs=Path(root) / "in", output=out)


@st.composite
def safetensors_files(draw):
    """A small real safetensors file, then a header field or the length prefix corrupted."""
    header = {"w": {"dtype": "F32", "shape": [4, 8], "data_offsets": [0, 128]},
              "model.layers.0.mlp.up_proj.weight": {"dtype": "F32", "shape": [4, 8], "data_offsets": [128, 256]}}
    name = draw(st.sampled_from(sorted(header)))
    key = draw(st.sampled_from(["dtype", "shape", "data_offsets", None]))
    if key is not None:
        header[name][key] = draw(st.one_of(json_values, st.lists(st.integers(-300, 300), max_size=3)))
    raw = json.dumps(header).encode()
    length = len(raw) + draw(st.sampled_from([0, 0, 0, -1, 3, 2**40]))
    return struct.pack("<Q", max(length, 0)) + raw + bytes(draw(st.integers(0, 300)))


@BOUNDED
@given(safetensors_files())
def test_convert_any_safetensors_file(raw):
    with tempfile.TemporaryDirectory() as root:
        (Path(root) / "in").mkdir()
        source = Path(root) / "in" / "m.safetensors"
        source.write_bytes(raw)
        out = Path(root) / "out.safetensors"
        run("convert", "-i", source, "-o", out, "--quant-type", "ternary", "--group-size", "-1",
            inputs=Path(root) / "in", output=out)


@BOUNDED
@given(file_bytes(mangled_json()), st.booleans())
def test_compare_any_results_file(raw, as_list):
    with tempfile.TemporaryDirectory() as root:
        inputs = Path(root) / "in"
        inputs.mkdir()
        (inputs / "a.json").write_bytes(raw)
        good = [{"id": 0, "token_ids": [1, 2]}]
        (inputs / "b.json").write_text(json.dumps(good if as_list else
                                                  {"schema": "bitcpm.results/1", "results": good}))
        out = Path(root) / "report.json"
        run("compare", inputs / "a.json", inputs / "b.json", "--output", out, inputs=inputs, output=out)


prompt_lines = st.lists(st.one_of(mangled_json(), st.text(max_size=20),
                                  st.fixed_dictionaries({}, optional={"prompt": json_values, "id": json_values,
                                                                      "messages": json_values}).map(json.dumps)),
                        max_size=3)


@settings(max_examples=15, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.one_of(prompt_lines.map(lambda lines: "\n".join(lines).encode()), st.binary(max_size=80)),
       st.sampled_from([".jsonl", ".json", ".txt"]), st.booleans())
def test_infer_any_prompts_file(model, raw, suffix, chat):
    with tempfile.TemporaryDirectory() as root:
        inputs = Path(root) / "in"
        inputs.mkdir()
        (inputs / f"p{suffix}").write_bytes(raw)
        out = Path(root) / "r.json"
        run("infer", "-m", model, "--prompts", inputs / f"p{suffix}", "-o", out, "--device", "cpu",
            "--max-new-tokens", "1", "-q", *(["--chat"] if chat else []), inputs=inputs, output=out)


chat_records = st.one_of(
    mangled_json(),
    st.fixed_dictionaries({}, optional={"messages": json_values, "conversations": json_values,
                                        "instruction": json_values, "output": json_values}).map(json.dumps),
)


@settings(max_examples=20, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.one_of(st.lists(chat_records, max_size=3).map(lambda lines: "\n".join(lines).encode()),
                 st.binary(max_size=80)), st.sampled_from([".jsonl", ".json"]))
def test_sft_preview_any_chat_data(model, raw, suffix):
    with tempfile.TemporaryDirectory() as root:
        inputs = Path(root) / "in"
        inputs.mkdir()
        (inputs / f"chat{suffix}").write_bytes(raw)
        run("sft", "--model", model, "--data", inputs / f"chat{suffix}", "--preview", "1", inputs=inputs)


@BOUNDED
@given(file_bytes(yaml_text), st.sampled_from([".yaml", ".json"]),
       st.lists(st.text(alphabet="abcdelrstmx_=.-&*[]{}01 :", max_size=12), max_size=2))
def test_train_any_recipe(raw, suffix, overrides):
    with tempfile.TemporaryDirectory() as root:
        inputs = Path(root) / "in"
        inputs.mkdir()
        (inputs / f"recipe{suffix}").write_bytes(raw)
        out = Path(root) / "run"
        run("train", "--config", inputs / f"recipe{suffix}", "--output-dir", out, "--model", Path(root) / "missing",
            *[o for o in overrides if o.strip() and not o.startswith("-")], inputs=inputs, output=out)
        assert not out.exists()
