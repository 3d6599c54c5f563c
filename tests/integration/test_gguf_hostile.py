"""GGUF export (and the commands that load a model) against hostile or careless model folders, issue #23:
broken tokenizer files (item 5) are exit 2 with one `error:` line naming the file and key, nothing written and the
input unchanged; MiniCPM scale fields that are not positive numbers are refused by every command (item 5); a
`minicpm` config without its scales is refused by GGUF export (item 12); a LongRoPE Llama config that also sets
MiniCPM's scales is exported with neutral scales, as transformers' Llama computes it (the published BitCPM4-1B
shape, which llama.cpp ran with a mean KLD of 2.38 against the HF model); the --gguf-embeddings hint (item 14)."""

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("gguf", reason="GGUF tests need the gguf extra: pip install -e '.[gguf]'")

from tests.fuzz.hostile import snapshot
from tests.helpers import bitcpm_in_process, bitcpm_script, build_tiny_model

TOKENIZER = Path(__file__).resolve().parents[2] / "configs" / "quickstart" / "tokenizer"


def one_error(run, start: str) -> None:
    """Exit 2, one `error:` line starting with `start`, a `hint:` line, no traceback (the installed script)."""
    lines = run.stderr.splitlines()
    assert run.returncode == 2, run.stderr
    assert lines[0].startswith(f"error: {start}") and lines[-1].startswith("hint: "), run.stderr
    assert sum(line.startswith("error:") for line in lines) == 1 and "Traceback" not in run.stderr


def refused(invoke, folder: Path, out: Path, *args: str, start: str, code: int = 2) -> str:
    """Run `convert -i folder -o out *args` in process: exit `code`, one error line starting with `start`, nothing
    written beside `out`, `folder` byte for byte as before. Returns stderr."""
    before = snapshot(folder)
    result = invoke("convert", "-i", folder, "-o", out, *args)
    lines = result.stderr.splitlines()
    assert result.exit_code == code, result.output
    assert lines[0].startswith(f"error: {start}"), result.stderr
    assert sum(line.startswith("error:") for line in lines) == 1 and "Traceback" not in result.output
    assert not out.exists() and not [p for p in out.parent.iterdir() if p.name.startswith(".bitcpm-")]
    assert snapshot(folder) == before
    return result.stderr


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A tiny fused model (64-wide: --gguf-type auto writes Q4_0) with the quickstart's SentencePiece-style BPE."""
    return build_tiny_model(tmp_path_factory.mktemp("hostile") / "fused", group_size=-1, tokenizer=TOKENIZER,
                            config={"vocab_size": 512})


def variant(model: Path, folder: Path, tokenizer=None, config=None, files: dict | None = None) -> Path:
    """A copy of `model` whose tokenizer.json (`tokenizer(parsed)` edits it in place) and tokenizer_config.json are
    changed, and whose `files` (name -> bytes, None removes) are written."""
    shutil.copytree(model, folder)
    for name, edit in (("tokenizer.json", tokenizer), ("tokenizer_config.json", config)):
        if edit is not None:
            data = json.loads((folder / name).read_text())
            edit(data)
            (folder / name).write_text(json.dumps(data))
    for name, raw in (files or {}).items():
        (folder / name).unlink(missing_ok=True) if raw is None else (folder / name).write_bytes(raw)
    return folder


def added(**fields):
    return {"id": 509, "content": "<x>", "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
            "special": True, **fields}


BROKEN = {  # label -> (variant arguments, the start of the one error line)
    "not JSON": ({"files": {"tokenizer.json": b"{not json"}}, "tokenizer.json is not valid JSON"),
    "not UTF-8": ({"files": {"tokenizer.json": b"\xff\xfe{}"}}, "tokenizer.json is not valid UTF-8"),
    "a list": ({"files": {"tokenizer.json": b"[1, 2]"}}, "tokenizer.json must hold a JSON object, not a list"),
    "no model": ({"tokenizer": lambda t: t.pop("model")}, 'tokenizer.json "model" must be an object, not null'),
    "no vocab": ({"tokenizer": lambda t: t["model"].pop("vocab")},
                 "tokenizer.json model.vocab must be an object of token -> id, not null"),
    "vocab as a list": ({"tokenizer": lambda t: t["model"].update(vocab=list(t["model"]["vocab"]))},
                        "tokenizer.json model.vocab must be an object of token -> id, not a list"),
    "string ids": ({"tokenizer": lambda t: t["model"]["vocab"].update({"<s>": "1"})},
                   "tokenizer.json model.vocab: 1 token(s) have an id that is not a non-negative integer"),
    "duplicated id": ({"tokenizer": lambda t: t["model"]["vocab"].update({"zz-new": 5})},
                      "tokenizer.json model.vocab: id 5 is given to both"),
    "id out of range": ({"tokenizer": lambda t: t["model"]["vocab"].update({"zz-new": 10**6})},
                        "tokenizer.json model.vocab: ids must be 0..509"),
    "merges of ints": ({"tokenizer": lambda t: t["model"].update(merges=[1, 2])},
                       'tokenizer.json model.merges: 2 merge(s) are not "a b" strings'),
    "merge triples": ({"tokenizer": lambda t: t["model"].update(merges=[["a", "b", "c"]])},
                      'tokenizer.json model.merges: 1 merge(s) are not "a b" strings'),
    "merges an object": ({"tokenizer": lambda t: t["model"].update(merges={"a": "b"})},
                         "tokenizer.json model.merges must be a list, not an object"),
    "huge merges": ({"tokenizer": lambda t: t["model"].update(merges=[["x", f"y{i}"] for i in range(200_000)])},
                    "tokenizer.json model.merges: 200000 merge(s) name tokens that are not in model.vocab"),
    "added token missing fields": ({"tokenizer": lambda t: t["added_tokens"].append({"id": 509})},
                                   "tokenizer.json added_tokens[6]: content (missing, must be a string)"),
    "added token id a string": ({"tokenizer": lambda t: t["added_tokens"].append(added(id="509"))},
                                "tokenizer.json added_tokens[6]: id (a string, must be an integer)"),
    "added token beyond": ({"tokenizer": lambda t: t["added_tokens"].append(added(id=100_000))},
                           "tokenizer.json added_tokens: the ids after model.vocab must be 509"),
    "added tokens an object": ({"tokenizer": lambda t: t.update(added_tokens={"a": 1})},
                               "tokenizer.json added_tokens must be a list, not an object"),
    "config not JSON": ({"files": {"tokenizer_config.json": b"{nope"}}, "tokenizer_config.json is not valid JSON"),
    "config a list": ({"files": {"tokenizer_config.json": b"[]"}},
                      "tokenizer_config.json must hold a JSON object, not a list"),
    "bos a number": ({"config": lambda c: c.update(bos_token=5)}, "tokenizer_config.json bos_token must be a token"),
    "bos not a token": ({"config": lambda c: c.update(eos_token="<nothere>")},
                        "tokenizer_config.json eos_token '<nothere>' is not a token of tokenizer.json"),
    "added_tokens_decoder key": ({"config": lambda c: c.update(added_tokens_decoder={"x": {"content": "a"}})},
                                 "tokenizer_config.json added_tokens_decoder['x']: the key must be a token id"),
    "special map a list": ({"files": {"special_tokens_map.json": b"[1]"}},
                           "special_tokens_map.json must hold a JSON object, not a list"),
    "corrupt tokenizer.model": ({"files": {"tokenizer.model": b"\x00garbage"}},
                                "tokenizer.model is not a SentencePiece model"),
    "only a corrupt tokenizer.model": ({"files": {"tokenizer.model": b"garbage", "tokenizer.json": None}},
                                       "the tokenizer files of"),
    "chat_template.json broken": ({"files": {"chat_template.json": b"{"}}, "chat_template.json is not valid JSON"),
}


@pytest.mark.parametrize("label", list(BROKEN))
def test_a_broken_tokenizer_file_is_one_error_naming_it(model, tmp_path, invoke, label):
    changes, start = BROKEN[label]
    folder = variant(model, tmp_path / "in", **copy.deepcopy(changes))
    (tmp_path / "out").mkdir()
    refused(invoke, folder, tmp_path / "out" / "m.gguf", "--format", "gguf", "--gguf-type", "auto", start=start)


def test_every_tokenizer_problem_is_reported_at_once_through_the_installed_script(model, tmp_path):
    def break_all(t):
        t["model"]["vocab"]["zz-new"] = 5
        t["model"]["merges"] = [1]
        t["added_tokens"].append({"id": 509})

    folder = variant(model, tmp_path / "in", tokenizer=break_all, files={"tokenizer.model": b"garbage"})
    before = snapshot(folder)
    run = bitcpm_script("convert", "-i", folder, "-o", tmp_path / "m.gguf", "--format", "gguf", "--gguf-type", "auto")
    one_error(run, f"the tokenizer files of {folder} cannot be exported: 4 problems")
    for text in ("id 5 is given to both", "model.merges: 1 merge(s)", "added_tokens[6]: content (missing",
                 "tokenizer.model is not a SentencePiece model"):
        assert f"  - tokenizer.{'model' if 'Sentence' in text else 'json'}" in run.stderr and text in run.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"] and snapshot(folder) == before


def test_the_sound_tokenizer_still_exports(model, tmp_path, invoke):
    result = invoke("convert", "-i", model, "-o", tmp_path / "m.gguf", "--format", "gguf", "--gguf-type", "auto")
    assert result.exit_code == 0, result.output


# ---- MiniCPM scale fields -------------------------------------------------------------------------------------------
def minicpm(model: Path, folder: Path, **scales) -> Path:
    shutil.copytree(model, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="minicpm", architectures=["MiniCPMForCausalLM"], **scales)
    (folder / "config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not None}))
    return folder


@pytest.mark.parametrize("field, value", [("dim_model_base", 0), ("scale_emb", -12), ("scale_depth", "1.4"),
                                          ("dim_model_base", True)])
def test_an_invalid_minicpm_scale_is_refused_by_convert_naming_it(model, tmp_path, invoke, field, value):
    scales = {"scale_emb": 12, "scale_depth": 1.4, "dim_model_base": 64, field: value}
    folder = minicpm(model, tmp_path / "in", **scales)
    (tmp_path / "out").mkdir()
    start = f"invalid MiniCPM scale in {folder / 'config.json'}: {field}: config.json says {value!r}"
    refused(invoke, folder, tmp_path / "out" / "fused", start=start)
    refused(invoke, folder, tmp_path / "out" / "m.gguf", "--format", "gguf", "--gguf-type", "auto", start=start)


def test_dim_model_base_0_is_refused_by_infer_through_the_installed_script(model, tmp_path):
    folder = minicpm(model, tmp_path / "in", scale_emb=12, scale_depth=1.4, dim_model_base=0)
    before = snapshot(folder)
    run = bitcpm_script("infer", "-m", folder, "-p", "Hello", "-o", tmp_path / "r.json", "--device", "cpu")
    one_error(run, f"invalid MiniCPM scale in {folder / 'config.json'}: dim_model_base: config.json says 0, "
                   "model_type 'minicpm' needs a positive number")
    assert not (tmp_path / "r.json").exists() and snapshot(folder) == before
    # convert and eval in-process (their installed-script runs: the tokenizer test above, tests/cli/)
    run = bitcpm_in_process("convert", "-i", folder, "-o", tmp_path / "m.gguf", "--format", "gguf", "--gguf-type",
                            "auto")
    one_error(run, "invalid MiniCPM scale in")
    corpus = tmp_path / "text.txt"
    corpus.write_text("hello world\n" * 20)
    run = bitcpm_in_process("eval", "-m", folder, "--data", corpus, "--context", "16", "--device", "cpu")
    one_error(run, "invalid MiniCPM scale in")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "text.txt"]


def test_dim_model_base_0_in_a_packed_model_is_refused_by_infer(model, tmp_path, invoke):
    """A packed model skips the shape check (its tensors are codes), not the scale check."""
    import json

    folder = minicpm(model, tmp_path / "in", scale_emb=12, scale_depth=1.4, dim_model_base=256)
    result = invoke("convert", "-i", str(folder), "-o", str(tmp_path / "packed"), "--format", "packed")
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "packed" / "config.json").read_text())
    (tmp_path / "packed" / "config.json").write_text(json.dumps({**config, "dim_model_base": 0}))
    result = invoke("infer", "-m", str(tmp_path / "packed"), "-p", "Hello", "-o", str(tmp_path / "r.json"),
                    "--device", "cpu")
    assert result.exit_code == 2 and "invalid MiniCPM scale in" in result.stderr, result.output
    assert not (tmp_path / "r.json").exists()


def test_a_minicpm_config_without_its_scales_is_refused_by_gguf_export(model, tmp_path, invoke):
    """Item 12: MiniCPM's own code would use 1 for each missing scale (logits / hidden_size), llama.cpp's
    converter refuses such a config, bitcpm used to write 1.0 for all three in silence."""
    folder = minicpm(model, tmp_path / "in")
    (tmp_path / "out").mkdir()
    stderr = refused(invoke, folder, tmp_path / "out" / "m.gguf", "--format", "gguf", "--gguf-type", "auto",
                     start="config.json (model_type 'minicpm') does not set scale_emb, scale_depth and "
                           "dim_model_base: GGUF export cannot tell the scales the model was trained with")
    assert "hint: set scale_emb, scale_depth and dim_model_base" in stderr


def test_the_gguf_embeddings_hint_names_what_the_option_offers(model, tmp_path):
    run = bitcpm_in_process("convert", "-i", model, "-o", tmp_path / "m.gguf", "--format", "gguf",
                            "--gguf-embeddings", "tq2_0")
    one_error(run, "--gguf-embeddings 'tq2_0' is not one of f16, bf16, q8_0")
    hint = run.stderr.splitlines()[-1]
    assert "tq2_0" not in hint and all(t in hint for t in ("f16", "bf16", "q8_0")), hint
    assert not (tmp_path / "m.gguf").exists()


# ---- a LongRoPE Llama with MiniCPM's scales: what llama.cpp computes is what transformers does ---------------------
def mean_kld(reference: torch.Tensor, other: torch.Tensor) -> float:
    """Mean over positions of KL(reference || other), both log-probabilities."""
    return float((reference.exp() * (reference - other)).sum(-1).mean())


def test_a_longrope_llama_with_minicpm_scales_matches_transformers(tmp_path, invoke):
    """The published BitCPM4-1B config is model_type llama with LongRoPE and scale_emb (and a dim_model_base in
    other releases): transformers' Llama ignores the scales, so the GGUF (llama.cpp's minicpm architecture, for the
    two factor lists) must hold neutral ones. It held the config's: mean KLD 2.38 against the HF model."""
    pytest.importorskip("llama_cpp", reason="llama.cpp tests need llama-cpp-python (the gguf extra)")
    from tests.integration.test_gguf import (
        edit_config,
        logprobs_llamacpp,
        logprobs_transformers,
        longrope,
        minicpm_reference,
        qat_model,
    )

    qat_model(tmp_path / "qat", group_size=-1)
    edit_config(tmp_path / "qat", rope_parameters=longrope(), max_position_embeddings=1024, scale_emb=12,
                scale_depth=1.4, dim_model_base=64)
    assert invoke("convert", "-i", tmp_path / "qat", "-o", tmp_path / "fused").exit_code == 0
    done = invoke("convert", "-i", tmp_path / "qat", "-o", tmp_path / "m.gguf", "--format", "gguf", "--json")
    assert done.exit_code == 0, done.output
    report = json.loads(done.stdout)
    assert report["architecture"] == "minicpm" and any("neutral scales" in n for n in report["notes"])
    ids = [1] + list(range(40, 140, 2))
    llama = logprobs_llamacpp(tmp_path / "m.gguf", ids)
    hf = logprobs_transformers(tmp_path / "fused", ids)
    scaled = minicpm_reference(tmp_path / "fused", tmp_path / "scaled", 12.0, 1.4, 64)  # what used to be written
    kld, kld_scaled = mean_kld(hf, llama), mean_kld(logprobs_transformers(scaled, ids), llama)
    assert np.isfinite(kld) and kld < 0.05 and kld < kld_scaled / 20, (kld, kld_scaled)
    fields = __import__("gguf").GGUFReader(str(tmp_path / "m.gguf")).fields
    assert [float(fields[f"minicpm.{k}"].parts[-1][0]) for k in ("embedding_scale", "residual_scale",
                                                                  "logit_scale")] == [1.0, 1.0, 1.0]
