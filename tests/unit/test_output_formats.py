"""The output formats' one table: `convert --format X` dispatches through `OUTPUT_FORMATS`, and a format added to the
table is reachable through the CLI with nothing else changed."""

import dataclasses
import inspect
import json
import sys

import pytest
import torch
from safetensors.torch import load_file

from bitcpm_cli.core.conversion import formats
from bitcpm_cli.core.conversion.formats import OUTPUT_FORMATS, ConvertRequest, OutputFormat, convert
from bitcpm_cli.core.conversion.report import ConvertResult
from bitcpm_cli.core.errors import InputError
from tests.unit.test_convert import make_qat

UNKNOWN = ("--format 'x' is not one of fused, packed, gguf",
           "fused for transformers / vLLM, packed for 2 bits a weight, gguf for llama.cpp")


def test_the_table_holds_fused_packed_and_gguf_in_that_order():
    assert list(OUTPUT_FORMATS) == ["fused", "packed", "gguf"]
    assert OUTPUT_FORMATS["fused"].run is OUTPUT_FORMATS["packed"].run is formats._write_checkpoint
    assert OUTPUT_FORMATS["gguf"].run is formats._export_gguf
    # The bar: fused and packed report progress, gguf does not (as before the table).
    assert [name for name, entry in OUTPUT_FORMATS.items() if entry.progress] == ["fused", "packed"]


@pytest.mark.parametrize("fmt", ["fused", "packed"])
def test_fused_and_packed_run_the_checkpoint_conversion(tmp_path, fmt):
    make_qat(tmp_path / "qat")
    stages = set()
    result = convert(fmt, tmp_path / "qat", tmp_path / "out", dtype="float32", verify=True, max_shard_size="100KB",
                     progress=lambda stage, done, total: stages.add(stage))
    assert isinstance(result, ConvertResult) and result.format == fmt and result.verify.ok
    assert result.shards > 1  # --max-shard-size parsed and passed on
    assert stages == {"convert", "verify"}
    names = set().union(*(load_file(p) for p in (tmp_path / "out").glob("*.safetensors")))
    assert any(name.endswith(".weight_packed") for name in names) == (fmt == "packed")


def test_gguf_runs_the_gguf_export_with_its_options(tmp_path, monkeypatch):
    from bitcpm_cli.core.conversion.gguf import export

    calls = []

    def spy(*args, **kwargs):
        inspect.signature(real).bind(*args, **kwargs)  # what the runner passes, export_gguf takes
        calls.append((args, kwargs))
        return "exported"

    real = export.export_gguf
    monkeypatch.setattr(export, "export_gguf", spy)
    result = convert("gguf", tmp_path / "qat", tmp_path / "m.gguf", gguf_type="auto", embeddings="q8_0",
                     allow_lossy=True, overwrite=True, quant_type="ternary", group_size=-1, scheme_file=None,
                     verify=True, max_shard_size="not a size", progress=lambda *a: 1 / 0)
    assert result == "exported"
    assert calls == [((tmp_path / "qat", tmp_path / "m.gguf"),
                      dict(gguf_type="auto", embeddings="q8_0", allow_lossy=True, overwrite=True, quant_type="ternary",
                           group_size=-1, scheme_file=None))]


def test_gguf_without_gguf_py_is_refused_naming_the_extra(tmp_path, monkeypatch):
    make_qat(tmp_path / "qat")
    monkeypatch.setitem(sys.modules, "gguf", None)
    with pytest.raises(InputError, match="needs gguf-py"):
        convert("gguf", tmp_path / "qat", tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


def test_an_unknown_format_is_refused_listing_the_table(tmp_path):
    with pytest.raises(InputError) as refused:
        convert("x", tmp_path / "qat", tmp_path / "out")
    assert (str(refused.value), refused.value.hint) == UNKNOWN
    assert not formats.reports_progress("x")


def test_an_unknown_format_on_the_command_line_is_exit_2_listing_the_table(invoke, tmp_path):
    make_qat(tmp_path / "qat")
    result = invoke("convert", "-i", tmp_path / "qat", "-o", tmp_path / "out", "--format", "x")
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [f"error: {UNKNOWN[0]}", f"hint: {UNKNOWN[1]}"]
    assert result.stdout == "" and sorted(p.name for p in tmp_path.iterdir()) == ["qat"]


def _copy(request: ConvertRequest) -> ConvertResult:
    """A format made for the test: the fused conversion in float32, whatever --dtype says."""
    return formats._write_checkpoint(dataclasses.replace(request, fmt="fused", dtype="float32"))


@pytest.mark.parametrize("json_output", [True, False], ids=["json", "table"])
def test_a_format_added_to_the_table_is_reachable_through_the_cli(invoke, tmp_path, monkeypatch, json_output):
    """The recipe for a new output format: one runner and one entry in the table, nothing in the CLI."""
    make_qat(tmp_path / "qat")
    monkeypatch.setitem(OUTPUT_FORMATS, "copy", OutputFormat(_copy, "a test"))
    result = invoke("convert", "-i", tmp_path / "qat", "-o", tmp_path / "out", "--format", "copy",
                    *(["--json"] if json_output else []))
    assert result.exit_code == 0, result.output
    if json_output:
        assert json.loads(result.stdout)["dtype"] == "float32"
    else:
        assert "wrote" in result.stdout
    assert {t.dtype for t in load_file(tmp_path / "out" / "model.safetensors").values()} == {torch.float32}
    unknown = invoke("convert", "-i", tmp_path / "qat", "-o", tmp_path / "o2", "--format", "x")
    assert unknown.exit_code == 2
    assert "error: --format 'x' is not one of fused, packed, gguf, copy" in unknown.stderr
    assert "copy for a test" in unknown.stderr
