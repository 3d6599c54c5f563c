import json
import random
from pathlib import Path

import pytest

from tests.helpers import build_tiny_model
from tests.unit.test_inference_ready import generates_with_cache

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "configs" / "sft" / "tiny-cpu.yaml"
REPLY = "OK, done."


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft")
    build_tiny_model(root / "float", kind="float")
    rng = random.Random(0)
    with (root / "chat.jsonl").open("w") as handle:
        for _ in range(200):
            digits = "".join(str(rng.randint(0, 9)) for _ in range(rng.randint(3, 8)))
            handle.write(json.dumps({"messages": [{"role": "user", "content": digits},
                                                  {"role": "assistant", "content": REPLY}]}) + "\n")
    return root


def test_fine_tune_reaches_near_zero_loss_and_answers_through_infer_chat(setup, tmp_path, invoke):
    result = invoke("sft", "--config", RECIPE, "--model", setup / "float", "--data", setup / "chat.jsonl",
                    "--output-dir", tmp_path / "run")
    assert result.exit_code == 0, result.output
    assert "supervised tokens" in result.output and "2,200" in result.output
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < 0.05
    summary = json.loads((tmp_path / "run" / "data_summary.json").read_text())
    assert summary["examples_used"] == 200 and summary["supervised_tokens"] == 200 * (len(REPLY) + 2)  # reply, <|im_end|>, "\n" (as LLaMA-Factory)
    final = tmp_path / "run" / "final"
    assert json.loads((final / "config.json").read_text())["use_cache"] is True  # training turned it off
    assert not (final / "training_args.bin").exists()
    generates_with_cache(final)
    from transformers import AutoTokenizer

    from bitcpm_cli.core.model.tokenizer_bos import adds_bos

    # sft's data is the chat template's rendering: final/ keeps its input tokenizer's BOS behaviour (README)
    assert adds_bos(AutoTokenizer.from_pretrained(final)) == adds_bos(AutoTokenizer.from_pretrained(setup / "float"))
    assert "im_start" in json.loads((final / "tokenizer_config.json").read_text()).get("chat_template", "") or \
        (final / "chat_template.jinja").is_file()
    answered = invoke("infer", "-m", final, "--chat", "-p", "48213", "-p", "907", "-o", tmp_path / "r.json",
                      "--max-new-tokens", "20", "--device", "cpu", "-q")
    assert answered.exit_code == 0, answered.output
    results = json.loads((tmp_path / "r.json").read_text())["results"]
    assert [r["text"] for r in results] == [REPLY, REPLY]


def test_preview_shows_supervised_spans_and_trains_nothing(setup, tmp_path, invoke):
    result = invoke("sft", "--config", RECIPE, "--model", setup / "float", "--data", setup / "chat.jsonl",
                    "--output-dir", tmp_path / "run", "--preview", "2")
    assert result.exit_code == 0, result.output
    assert "example 0:" in result.output and "example 1:" in result.output and "11 supervised" in result.output
    assert "<|im_start|>assistant\n[[OK, done.<|im_end|>\n]]" in result.output  # marked in text off a terminal
    assert "[[...]]: supervised (loss); the rest is masked" in result.output
    as_json = invoke("sft", "--config", RECIPE, "--model", setup / "float", "--data", setup / "chat.jsonl",
                     "--output-dir", tmp_path / "run", "--preview", "2", "--json")
    assert as_json.exit_code == 0, as_json.output
    document = json.loads(as_json.stdout)  # stdout holds the JSON document alone
    assert len(document["examples"]) == 2 and document["examples"][0]["supervised_tokens"] == 11
    assert ["OK, done.<|im_end|>\n", True] in document["examples"][0]["segments"]
    assert not (tmp_path / "run").exists()


def test_bad_data_exit_2(setup, tmp_path, invoke):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    result = invoke("sft", "--config", RECIPE, "--model", setup / "float", "--data", bad, "--output-dir",
                    tmp_path / "run")
    assert result.exit_code == 2 and "no usable training examples" in result.stderr
    assert not (tmp_path / "run").exists()


def test_help(invoke):
    result = invoke("sft", "--help")
    assert result.exit_code == 0
    for flag in ("--max-length", "--packing", "--template", "--format", "--preview", "--model", "--resume"):
        assert flag in result.output


def test_packing_trains_with_examples_kept_apart(setup, tmp_path, invoke):
    result = invoke("sft", "--config", RECIPE, "--model", setup / "float", "--data", setup / "chat.jsonl",
                    "--output-dir", tmp_path / "run", "--packing", "--max-steps", "2")
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "run" / "data_summary.json").read_text())
    assert summary["packing"] and summary["sequences"] < 200


def test_json_report_on_stdout(setup, tmp_path, invoke):
    result = invoke("sft", "--config", RECIPE, "--model", setup / "float", "--data", setup / "chat.jsonl",
                    "--output-dir", tmp_path / "run", "--max-steps", "2", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["steps"] == 2 and report["data_summary"]["examples_used"] == 200
    assert report["final_dir"] == str(tmp_path / "run" / "final")
    assert "step 1/2" in result.stderr and "step 0/None" not in result.stderr


def test_columns_mapping_through_the_cli(setup, tmp_path, invoke):
    data = tmp_path / "qa.jsonl"
    data.write_text(json.dumps({"question": "2+2?", "answer": "4", "source": "web"}) + "\n")
    result = invoke("sft", "--config", RECIPE, "--model", setup / "float", "--data", data, "--output-dir",
                    tmp_path / "run", "--columns", "prompt=question", "--columns", "response=answer", "--preview", "1")
    assert result.exit_code == 0, result.output
    assert "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n[[4<|im_end|>\n]]" in result.output
    assert "note: field 'source' is not used (1 record(s))" in result.output
    bad = invoke("sft", "--config", RECIPE, "--model", setup / "float", "--data", data, "--output-dir",
                 tmp_path / "run", "--columns", "answer=answer")
    assert bad.exit_code == 2 and "error: columns: 'answer' is not one of formatting" in bad.stderr
    assert not (tmp_path / "run").exists()
