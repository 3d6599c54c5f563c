import json

import pytest

from tests.helpers import build_tiny_model


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("m") / "fused")


def test_help(invoke):
    for command, flags in (("infer", ("--model", "--prompt", "--prompts", "--device", "--logprobs", "--chat")),
                           ("compare", ("--max-tokens", "--json", "--output", "--tie-margin", "--allow-near-ties"))):
        result = invoke(command, "--help")
        assert result.exit_code == 0
        assert all(flag in result.output for flag in flags)


def test_infer_then_compare_end_to_end(invoke, model, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Hello, how are you?\nThe capital of France is\n")
    for name in ("npu.json", "cpu.json"):
        result = invoke("infer", "--model", model, "--prompts", prompts, "--output", tmp_path / name, "--device",
                        "cpu", "--max-new-tokens", "16", "--logprobs", "2")
        assert result.exit_code == 0, result.output
        assert "generation summary" in result.output and "ms/token" in result.output
    doc = json.loads((tmp_path / "cpu.json").read_text())
    assert doc["schema"] == "bitcpm.results/1" and len(doc["results"]) == 2
    assert "[0]" in result.output and doc["results"][1]["text"][:5] in result.output  # streamed text
    same = invoke("compare", tmp_path / "npu.json", tmp_path / "cpu.json", "--output", tmp_path / "report.json")
    assert same.exit_code == 0, same.output
    assert "2/2 prompts identical" in same.output
    assert json.loads((tmp_path / "report.json").read_text())["ok"] is True
    as_json = invoke("compare", tmp_path / "npu.json", tmp_path / "cpu.json", "--json")
    assert as_json.exit_code == 0 and json.loads(as_json.stdout)["ok"] is True  # stdout is the JSON alone
    old = invoke("compare", tmp_path / "npu.json", tmp_path / "cpu.json", "--json", tmp_path / "old.json")
    assert old.exit_code == 2 and not (tmp_path / "old.json").exists()  # the old `--json FILE`: a usage error


def test_compare_flags_a_flipped_token(invoke, model, tmp_path):
    result = invoke("infer", "-m", model, "-p", "Hello", "-o", tmp_path / "a.json", "--max-new-tokens", "8", "-q",
                    "--device", "cpu")
    assert result.exit_code == 0, result.output
    doc = json.loads((tmp_path / "a.json").read_text())
    doc["results"][0]["token_ids"][3] = (doc["results"][0]["token_ids"][3] + 1) % 90 + 4
    (tmp_path / "b.json").write_text(json.dumps(doc))
    flipped = invoke("compare", tmp_path / "a.json", tmp_path / "b.json", "--tokenizer", model)
    assert flipped.exit_code == 1
    assert "diverged" in flipped.output and "0/1 prompts identical" in flipped.output
    assert flipped.stderr.startswith("error: 1 of 1 prompt(s) differ\nhint: the report above explains each divergence")
    assert "error:" not in flipped.stdout
    assert invoke("compare", tmp_path / "a.json", tmp_path / "b.json", "--max-tokens", "3").exit_code == 0


def test_infer_missing_npu_exit_2_no_results(invoke, model, tmp_path, fake_npu, monkeypatch):
    result = invoke("infer", "-m", model, "-p", "Hi", "-o", tmp_path / "r.json", "--device", "npu")
    assert result.exit_code == 2 and "torch_npu is not installed" in result.stderr
    fake_npu(available=True, count=0)
    monkeypatch.setenv("ASCEND_RT_VISIBLE_DEVICES", "4")
    result = invoke("infer", "-m", model, "-p", "Hi", "-o", tmp_path / "r.json", "--device", "npu")
    assert result.exit_code == 2 and "ASCEND_RT_VISIBLE_DEVICES=4 hides every NPU" in result.stderr
    assert "unset ASCEND_RT_VISIBLE_DEVICES" in result.stderr
    assert not (tmp_path / "r.json").exists()


def test_infer_bad_sampling_is_refused_before_loading(invoke, model, tmp_path):
    result = invoke("infer", "-m", model, "-p", "Hi", "-o", tmp_path / "r.json", "--max-new-tokens", "0")
    assert result.exit_code == 2 and result.stderr.startswith("error: invalid sampling settings")
    assert not (tmp_path / "r.json").exists()


def test_infer_missing_model_exit_2(invoke, tmp_path):
    result = invoke("infer", "-m", tmp_path / "nope", "-p", "Hi", "-o", tmp_path / "r.json")
    assert result.exit_code == 2 and result.stderr.startswith("error: model folder not found")
    assert not (tmp_path / "r.json").exists()


def test_compare_bad_input_exit_2(invoke, tmp_path):
    (tmp_path / "bad.json").write_text("{not json")
    result = invoke("compare", tmp_path / "bad.json", tmp_path / "missing.json")
    assert result.exit_code == 2 and "not valid JSON" in result.stderr
    (tmp_path / "ok.json").write_text('[{"token_ids": [1]}]')
    assert invoke("compare", tmp_path / "ok.json", tmp_path / "missing.json").exit_code == 2


def test_infer_json_on_stdout_and_eos_only_marker(invoke, model, tmp_path):
    result = invoke("infer", "-m", model, "-p", "Hello", "-o", tmp_path / "a.json", "--max-new-tokens", "4",
                    "--device", "cpu", "--json")
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert document == json.loads((tmp_path / "a.json").read_text())
    silent = build_tiny_model(tmp_path / "silent", kind="float")  # a model whose first token is <unk> (special)
    from transformers import AutoModelForCausalLM

    weights = AutoModelForCausalLM.from_pretrained(silent)
    weights.model.norm.weight.data.zero_()  # every logit 0: greedy picks token 0
    weights.generation_config.eos_token_id = 0
    weights.save_pretrained(silent)
    result = invoke("infer", "-m", silent, "-p", "Hello", "-o", tmp_path / "b.json", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "b.json").read_text())["results"][0]["text"] == ""
    assert "[0] <empty reply: end of sequence at once>" in result.stdout
