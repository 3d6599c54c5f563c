import json

import pytest

from bitcpm_cli.core.conversion.convert import convert_checkpoint
from bitcpm_cli.core.errors import ConfigError, DeviceError, InputError
from bitcpm_cli.core.engines.base import Prompt
from bitcpm_cli.core.engines.hf import load_for_inference, run_generation
from bitcpm_cli.core.engines.prompts import read_prompts
from bitcpm_cli.core.formats.results import RESULTS_SCHEMA

from tests.helpers import build_tiny_model

PROMPTS = [Prompt(0, text="Hello, how are you?"), Prompt(1, text="The capital of France is")]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    build_tiny_model(root / "qat", kind="qat")
    convert_checkpoint(root / "qat", root / "fused")
    convert_checkpoint(root / "qat", root / "packed", fmt="packed")
    return root


def generate(folder, **kwargs):
    loaded = load_for_inference(folder, device="cpu", dtype=kwargs.pop("dtype", "bfloat16"))
    return run_generation(loaded, kwargs.pop("prompts", PROMPTS), max_new_tokens=kwargs.pop("max_new_tokens", 24),
                          **kwargs)


def test_results_schema(models):
    doc = generate(models / "fused", logprobs=2)
    assert doc["schema"] == RESULTS_SCHEMA
    assert doc["model"]["format"] == "fused" and doc["model"]["dtype"] == "bfloat16"
    assert doc["model"]["fingerprint"].startswith("sha256:")
    runtime = doc["runtime"]
    assert runtime["engine"] == "hf" and runtime["device"] == "cpu"
    assert set(runtime) >= {"device_name", "torch", "transformers", "torch_npu", "cann", "host"}
    assert doc["sampling"]["temperature"] == 0.0 and doc["sampling"]["seed"] == 42
    first = doc["results"][0]
    assert set(first) >= {"id", "prompt", "prompt_token_ids", "token_ids", "text", "num_tokens", "latency_s",
                          "tokens_per_s", "top_logprobs"}
    assert first["num_tokens"] == len(first["token_ids"]) == len(first["top_logprobs"])
    assert doc["summary"]["total_tokens"] == sum(r["num_tokens"] for r in doc["results"])
    json.dumps(doc)


def test_greedy_token_is_top1_logprob(models):
    doc = generate(models / "fused", logprobs=3)
    for result in doc["results"]:
        for token, step in zip(result["token_ids"], result["top_logprobs"]):
            assert step[0][0] == token and len(step) == 3
            assert step[0][1] >= step[1][1] >= step[2][1]


def test_two_runs_are_identical(models):
    a, b = generate(models / "fused"), generate(models / "fused")
    assert [r["token_ids"] for r in a["results"]] == [r["token_ids"] for r in b["results"]]


def test_qat_checkpoint_and_its_fused_conversion_give_identical_tokens(models):
    qat, fused = generate(models / "qat", logprobs=2), generate(models / "fused", logprobs=2)
    assert qat["model"]["format"] == "qat"
    assert [r["token_ids"] for r in qat["results"]] == [r["token_ids"] for r in fused["results"]]
    assert [r["top_logprobs"] for r in qat["results"]] == [r["top_logprobs"] for r in fused["results"]]


def test_packed_model_gives_identical_tokens(models):
    packed, fused = generate(models / "packed"), generate(models / "fused")
    assert packed["model"]["format"] == "packed"
    assert [r["token_ids"] for r in packed["results"]] == [r["token_ids"] for r in fused["results"]]


def test_batched_generation_and_sampling(models):
    doc = generate(models / "fused", batch_size=2, dtype="float32")
    assert [r["id"] for r in doc["results"]] == [0, 1] and all(r["num_tokens"] > 0 for r in doc["results"])
    sampled = generate(models / "fused", temperature=0.8, top_p=0.9, seed=7)
    again = generate(models / "fused", temperature=0.8, top_p=0.9, seed=7)
    assert [r["token_ids"] for r in sampled["results"]] == [r["token_ids"] for r in again["results"]]


def test_chat_uses_default_template_when_tokenizer_has_none(models):
    doc = generate(models / "fused", chat=True, prompts=[Prompt(0, messages=[{"role": "user", "content": "Hi"}])])
    assert any("default (ChatML)" in n for n in doc["notes"])
    assert doc["sampling"]["chat_template"] is True


def test_messages_without_chat_flag(models):
    with pytest.raises(InputError, match="--chat"):
        generate(models / "fused", prompts=[Prompt(0, messages=[{"role": "user", "content": "Hi"}])])


def test_streaming_callback_sees_the_text(models):
    seen = {}
    doc = generate(models / "fused", on_text=lambda pid, text: seen.__setitem__(pid, seen.get(pid, "") + text))
    assert seen == {r["id"]: r["text"] for r in doc["results"]}


def test_missing_npu_is_an_error_naming_the_cause(models, fake_npu, monkeypatch):
    with pytest.raises(DeviceError, match="torch_npu is not installed"):
        load_for_inference(models / "fused", device="npu")
    fake_npu(available=True, count=0)
    monkeypatch.setenv("ASCEND_RT_VISIBLE_DEVICES", "4")
    with pytest.raises(DeviceError, match="ASCEND_RT_VISIBLE_DEVICES=4"):
        load_for_inference(models / "fused", device="npu")


def test_missing_model_and_mismatched_config(models, tmp_path):
    with pytest.raises(InputError, match="model folder not found"):
        load_for_inference(tmp_path / "nope", device="cpu")
    import shutil

    shutil.copytree(models / "fused", tmp_path / "bad")
    config = json.loads((tmp_path / "bad" / "config.json").read_text())
    config["num_hidden_layers"] = 4
    (tmp_path / "bad" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="num_hidden_layers"):
        load_for_inference(tmp_path / "bad", device="cpu")


def test_read_prompts_formats(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("first\n\nsecond\n")
    assert [p.text for p in read_prompts(None, txt)] == ["first", "second"]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"prompt": "a"}\n{"id": 7, "messages": [{"role": "user", "content": "b"}]}\n')
    prompts = read_prompts(None, jsonl)
    assert prompts[0].text == "a" and prompts[1].id == 7 and prompts[1].messages[0]["content"] == "b"
    assert [p.text for p in read_prompts(["x", "y"], None)] == ["x", "y"]


@pytest.mark.parametrize("content,message", [
    ('{"prompt": "a"}\n{oops\n', r"p.jsonl:2: not valid JSON"),
    ('{"text": "a"}\n', r"p.jsonl:1: needs a 'prompt' string"),
    ("\n", "holds no prompts"),
])
def test_read_prompts_errors(tmp_path, content, message):
    path = tmp_path / "p.jsonl"
    path.write_text(content)
    with pytest.raises(InputError, match=message):
        read_prompts(None, path)


def test_prompt_source_is_exactly_one(tmp_path):
    with pytest.raises(InputError, match="either --prompt"):
        read_prompts(None, None)
    with pytest.raises(InputError, match="either --prompt"):
        read_prompts(["a"], tmp_path / "p.txt")


def test_an_engine_added_to_the_registry_is_used(tmp_path, invoke, monkeypatch):
    """docs/architecture.md's recipe: an Engine subclass and one line in ENGINES, and `infer` finds it (by --engine
    and, through `accepts`, by auto); its document is the shared results format."""
    from bitcpm_cli.core.engines import registry
    from bitcpm_cli.core.engines.base import Engine, Session, describe_runtime
    from bitcpm_cli.core.formats.results import read_results, results_document

    class ReverseSession(Session):
        def __init__(self, path):
            self.info = {"path": str(path), "fingerprint": "sha256:0", "dtype": "none", "format": "reverse"}
            self.notes = []

        def generate(self, prompts, **settings):
            results = [{"id": p.id, "prompt": p.label, "prompt_token_ids": [1], "token_ids": [2, 3],
                        "text": p.text[::-1], "num_tokens": 2, "latency_s": 0.5, "tokens_per_s": 4.0}
                       for p in prompts]
            sampling = {"temperature": 0.0, "top_p": 1.0, "seed": settings["seed"],
                        "max_new_tokens": settings["max_new_tokens"], "chat_template": False, "batch_size": 1,
                        "logprobs": 0}
            return results_document(self.info, describe_runtime("reverse", "cpu", "test"), sampling, results,
                                    0.5, self.notes)

    class ReverseEngine(Engine):
        name = "reverse"

        def accepts(self, path):
            return path.suffix == ".rev"

        def open(self, path, **options):
            return ReverseSession(path)

    monkeypatch.setitem(registry.ENGINES, "reverse", ReverseEngine())
    model = tmp_path / "m.rev"
    model.write_text("")
    for engine in ("reverse", "auto"):
        out = tmp_path / f"{engine}.json"
        result = invoke("infer", "-m", model, "-p", "abc", "-o", out, "--engine", engine, "--quiet")
        assert result.exit_code == 0, result.output
        document = json.loads(out.read_text())
        assert document["runtime"]["engine"] == "reverse" and document["results"][0]["text"] == "cba"
        assert read_results(out)[1][0]["token_ids"] == [2, 3]
    refused = invoke("infer", "-m", model, "-p", "abc", "-o", tmp_path / "x.json", "--engine", "nope")
    assert refused.exit_code == 2 and "auto, hf, llama.cpp, vllm, reverse" in refused.stderr
