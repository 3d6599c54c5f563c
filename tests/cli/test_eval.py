"""`bitcpm eval` end to end: QAT vs its conversions, gates, the report, and every input it refuses."""

import importlib.util
import json
from pathlib import Path

import pytest

from bitcpm_cli.core.conversion.convert import convert_checkpoint
from tests.helpers import build_tiny_model

TEXT = "the quick brown fox jumps over the lazy dog\n1 2 3 4 5, and 6!\nHello: is it me you're looking for?\n"
EVAL_TASKS = Path(__file__).resolve().parents[2] / "configs" / "eval"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    build_tiny_model(root / "qat", kind="qat")
    convert_checkpoint(root / "qat", root / "fused", dtype="float32")
    convert_checkpoint(root / "qat", root / "packed", fmt="packed", dtype="float32")
    build_tiny_model(root / "float", kind="float", seed=1)
    (root / "t.txt").write_text(TEXT)
    return root


def test_qat_vs_fused_and_packed_is_exact_in_float32(models, invoke, tmp_path):
    result = invoke("eval", "-m", models / "qat", "-m", models / "fused", "-m", models / "packed", "-m",
                    models / "float", "--data", models / "t.txt", "--context", "32", "--device", "cpu",
                    "-o", tmp_path / "r.json")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["schema"] == "bitcpm.eval/1" and report["reference"] == str(models / "qat")
    qat, fused, packed, float_ = report["models"]
    assert [m["format"] for m in report["models"]] == ["qat", "fused", "packed", "float"]
    assert qat["reference"] and "vs_reference" not in qat and "fake quantizer's forward" in qat["notes"][0]
    assert qat["tokens"] == report["data"]["scored_tokens"] == report["data"]["tokens"] - 1
    for converted in (fused, packed):
        versus = converted["vs_reference"]
        assert versus["mean_kld"] == 0 and versus["max_kld"] == 0 and versus["p99_kld"] == 0
        assert versus["same_top_pct"] == 100 and versus["rms_dp_pct"] == 0
        assert converted["mean_nll"] == qat["mean_nll"]
    versus = float_["vs_reference"]  # another model: a clear, positive divergence
    assert versus["mean_kld"] > 0.001 and versus["max_kld"] >= versus["p99_kld"] >= versus["median_kld"] > 0
    assert versus["rms_dp_pct"] > 0 and float_["mean_nll"] != qat["mean_nll"]
    assert "100.00" in result.output and "(ref)" in result.output and "wrote" in result.output


def test_json_on_stdout_and_the_reference_option(models, invoke):
    result = invoke("eval", "-m", models / "fused", "-m", models / "float", "--reference", models / "float",
                    "--data", models / "t.txt", "--context", "16", "--stride", "4", "--max-tokens", "40", "--json",
                    "--device", "cpu")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert [Path(m["path"]).name for m in report["models"]] == ["float", "fused"]
    assert report["data"]["tokens"] == 40 and report["models"][1]["tokens"] == 39
    assert report["settings"]["stride"] == 4


def test_gates_exit_1_and_still_write_the_report(models, invoke, tmp_path):
    args = ["eval", "-m", models / "qat", "-m", models / "fused", "-m", models / "float", "--data", models / "t.txt",
            "--context", "32", "--device", "cpu", "-o", tmp_path / "r.json"]
    result = invoke(*args, "--max-kld", "0.0001")
    assert result.exit_code == 1 and "1 gate(s) failed" in result.stderr and "float: mean KLD" in result.stderr
    assert json.loads((tmp_path / "r.json").read_text())["gates"]["failures"][0].startswith(str(models / "float"))
    passed = invoke("eval", "-m", models / "qat", "-m", models / "fused", "--data", models / "t.txt", "--context",
                    "32", "--device", "cpu", "--max-kld", "0", "--min-top1", "100")
    assert passed.exit_code == 0, passed.output
    assert invoke(*args, "--min-top1", "99.9").exit_code == 2  # the report exists: --overwrite to replace it
    assert invoke(*args, "--min-top1", "99.9", "--overwrite").exit_code == 1


def refused(invoke, tmp_path, *args):
    result = invoke("eval", *args, "-o", tmp_path / "r.json")
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and result.stderr.startswith("error: ")
    assert not (tmp_path / "r.json").exists()
    return result.stderr


def test_bad_inputs_are_exit_2_with_nothing_written(models, invoke, tmp_path):
    (tmp_path / "empty.txt").write_text("\n\n")
    assert "holds no text to score" in refused(invoke, tmp_path, "-m", models / "qat", "--data", tmp_path / "empty.txt",
                                               "--context", "32")
    assert "larger than" in refused(invoke, tmp_path, "-m", models / "qat", "--data", models / "t.txt",
                                    "--context", "1000")
    stderr = refused(invoke, tmp_path, "-m", models / "qat", "-m", models / "nope", "--data", tmp_path / "x.csv",
                     "--stride", "600", "--min-top1", "101")
    for problem in ("model not found", "--data file not found", "--stride 600", "--min-top1 101"):
        assert problem in stderr  # every problem at once
    assert "give at least two models" in refused(invoke, tmp_path, "-m", models / "qat", "--data",
                                                 models / "t.txt", "--max-kld", "1", "--context", "32")


def test_another_vocabulary_is_refused_naming_the_first_differing_token(models, invoke, tmp_path):
    other = build_tiny_model(tmp_path / "other", kind="fused")
    data = json.loads((other / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    a, b = "x", "y"
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (other / "tokenizer.json").write_text(json.dumps(data))
    stderr = refused(invoke, tmp_path, "-m", models / "qat", "-m", other, "--data", models / "t.txt")
    assert "another vocabulary" in stderr and f"is {a!r} in the reference, {b!r} here" in stderr.replace("\n", "")


def test_missing_extras_are_exit_2(models, invoke, tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("lm_eval", "llama_cpp") else real(name, *a))
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    stderr = refused(invoke, tmp_path, "-m", models / "qat", "-m", tmp_path / "m.gguf", "--data", models / "t.txt")
    assert "needs llama_cpp" in stderr and "[gguf]" in stderr
    stderr = refused(invoke, tmp_path, "-m", models / "qat", "--data", models / "t.txt", "--tasks", "x")
    assert "lm-evaluation-harness" in stderr and "[eval]" in stderr


def test_harness_tasks_offline_with_percent_kept(models, invoke, tmp_path):
    pytest.importorskip("lm_eval", reason="--tasks needs the eval extra")
    result = invoke("eval", "-m", models / "qat", "-m", models / "fused", "-m", models / "float", "--data",
                    models / "t.txt", "--context", "32", "--device", "cpu", "--tasks", "bitcpm_counting",
                    "--include-path", EVAL_TASKS, "-o", tmp_path / "r.json")
    assert result.exit_code == 0, result.output
    qat, fused, float_ = json.loads((tmp_path / "r.json").read_text())["models"]
    assert 0 <= qat["tasks"]["bitcpm_counting"]["acc"] <= 1
    assert fused["tasks"] == qat["tasks"]  # the fake quantizer's forward and the fused weights: the same scores
    assert qat["tasks_kept_pct"]["bitcpm_counting"] == 100 == fused["tasks_kept_pct"]["bitcpm_counting"]
    assert "acc 0." in result.stdout and "(100.0" in result.stdout
    (tmp_path / "bad").mkdir()
    unknown = refused(invoke, tmp_path / "bad", "-m", models / "qat", "--data", models / "t.txt", "--context", "32",
                      "--tasks", "nope", "--include-path", EVAL_TASKS)
    assert "unknown task(s): nope" in unknown


def test_help(invoke):
    result = invoke("eval", "--help")
    assert result.exit_code == 0
    for option in ("--model", "--data", "--reference", "--context", "--stride", "--max-tokens", "--max-kld",
                   "--min-top1", "--tasks", "--include-path", "--json", "--output"):
        assert option in result.output
