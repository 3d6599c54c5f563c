import importlib.util
import json

import pytest

from tests.helpers import bitcpm_script


@pytest.mark.slow
def test_quickstart_end_to_end(invoke, tmp_path):
    # the installed script with every extra and DS_ACCELERATOR unset: stdout is the JSON document alone (DeepSpeed's
    # "Setting accelerator to CPU" line, printed on the real stdout when it is unset, goes to stderr; issue #23)
    run = bitcpm_script("quickstart", "--output-dir", tmp_path / "qs", "--json", unset=("DS_ACCELERATOR",),
                        timeout=1800)
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads(run.stdout)["correct"] is True and "done train (ternary QAT)" in run.stderr
    summary = (tmp_path / "qs" / "SUMMARY.md").read_text()
    assert "| NO |" not in summary and "token-identical" in summary
    for produced in ("pretrain/final/config.json", "sft/final/tokenizer.json", "fused/model.safetensors",
                     "packed/model.safetensors", "results-qat.json", "results-fused.json", "compare.json", "loss.png"):
        assert (tmp_path / "qs" / produced).exists(), produced
    assert json.loads((tmp_path / "qs" / "compare.json").read_text())["ok"] is True
    if importlib.util.find_spec("gguf") is not None:
        assert (tmp_path / "qs" / "model-tq2_0.gguf").is_file()
    if importlib.util.find_spec("llama_cpp") is not None:
        assert json.loads((tmp_path / "qs" / "compare-engines.json").read_text())["ok"] is True
    for line in summary.splitlines():
        if "`" in line and line.startswith("| "):
            assert line.endswith("| yes |"), line
    # the eval stage: every format scored on the same held-out tokens against the QAT checkpoint
    report = json.loads((tmp_path / "qs" / "eval.json").read_text())
    formats = [m["format"] for m in report["models"]]
    assert formats[:4] == ["qat", "float", "fused", "packed"] and "What each step cost" in summary
    for converted in report["models"][2:4]:  # bf16 fused / packed weights scored in float32: nearly identical
        assert converted["vs_reference"]["mean_kld"] < 0.01 and converted["vs_reference"]["same_top_pct"] >= 95
    assert report["models"][1]["vs_reference"]["mean_kld"] > 1  # the random start point knows nothing
    if importlib.util.find_spec("llama_cpp") is not None:
        assert formats[4] == "gguf"
        qs = tmp_path / "qs"
        assert json.loads((qs / "sft" / "final" / "config.json").read_text())["bitcpm_quant"]["activations"] == "q8_k"
        versus = {}  # trained with Q8_K activations, as llama.cpp runs TQ2_0: the same weights scored A8 and A16
        for activations in ("q8_k", "none"):  # against the float32 QAT checkpoint (the GGUF: its fp16 fusion)
            result = invoke("eval", "-m", qs / "sft" / "final", "-m", qs / "model-tq2_0.gguf", "--data",
                            qs / "held-out.txt",
                            "--context", "64", "--device", "cpu", "--json", "--activations", activations)
            assert result.exit_code == 0, result.output
            qat, gguf = json.loads(result.stdout)["models"]
            assert qat["activations"] == activations and gguf["activations"].startswith("llama.cpp: q8_k (TQ2_0)")
            versus[activations] = gguf["vs_reference"]
            assert 0 < versus[activations]["mean_kld"] < 0.05 and versus[activations]["same_top_pct"] >= 95, versus
        assert versus["q8_k"]["mean_kld"] < versus["none"]["mean_kld"] / 3, versus
        assert versus["q8_k"]["same_top_pct"] >= versus["none"]["same_top_pct"], versus


def test_quickstart_refuses_a_non_empty_folder(invoke, tmp_path):
    (tmp_path / "qs").mkdir()
    (tmp_path / "qs" / "keep.txt").write_text("mine")
    result = invoke("quickstart", "--output-dir", tmp_path / "qs")
    assert result.exit_code == 2 and "is not empty" in result.stderr
    assert [p.name for p in (tmp_path / "qs").iterdir()] == ["keep.txt"]


def test_quickstart_refuses_a_file_as_output(invoke, tmp_path):
    (tmp_path / "x.json").write_text("{}")
    result = invoke("quickstart", "--output-dir", tmp_path / "x.json")
    assert result.exit_code == 2 and "is a file" in result.stderr and "Traceback" not in result.output
    assert (tmp_path / "x.json").read_text() == "{}"


def test_help(invoke):
    result = invoke("quickstart", "--help")
    assert result.exit_code == 0 and "--output-dir" in result.output
