"""Issue #23 items 4, 5 (unknown model_type), 6 and 14 (a .gguf under --engine hf), through the installed `bitcpm`
script: a chat template that fails (syntax, sandbox refusal, raise_exception, a type error or undefined value, not a
string) in `sft --template FILE`, `sft --template auto` and `infer --chat` (hf and llama.cpp), `--logprobs K` beyond
the vocabulary, and a config.json `model_type` transformers cannot build are each exit 2 with one `error:` line naming
the source, nothing written, inputs unchanged, and the sandbox holds (no marker file)."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bitcpm_cli.cli.app import app
from tests.fuzz.hostile import snapshot
from tests.helpers import bitcpm_script, build_tiny_model, copy_with_chat_template

CHAT = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}]


def cli(*args, installed: bool = True, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """The command through the installed script (a subprocess), or in-process (CliRunner) where one installed-script
    run of the same command already shows the exit code and message: the in-process run keeps the suite fast."""
    if installed:
        return bitcpm_script(*args, cwd=cwd)
    result = CliRunner().invoke(app, [str(a) for a in args])
    return subprocess.CompletedProcess(args, result.exit_code, result.stdout, result.stderr)


def one_error(run, *needles: str) -> str:
    """Exit 2, one `error:` line naming every needle (the last lines: a command may report progress before it), then
    a `hint:` line last, no traceback."""
    lines = run.stderr.splitlines()
    assert run.returncode == 2, run.stderr + run.stdout
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1].startswith("hint: "), run.stderr
    assert "Traceback" not in run.stderr and "internal error" not in run.stderr, run.stderr
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    return errors[0]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("chat")
    build_tiny_model(root / "fused")
    (root / "chat.jsonl").write_text("".join(json.dumps(record) + "\n" for record in CHAT))
    return root


def with_template(tiny: Path, folder: Path, template, where: str = "jinja") -> Path:
    """A copy of the tiny model whose chat template is `template`, in chat_template.jinja or tokenizer_config.json."""
    return copy_with_chat_template(tiny / "fused", folder, template, where)


MARKER_ESCAPE = ("{{ ''.__class__.__mro__[1].__subclasses__() }}"
                 "{{ cycler.__init__.__globals__.os.system('touch MARKER') }}")
BROKEN = {  # template -> what the error line names
    "syntax": ("{% for m in messages %}{{ m.content }", "TemplateSyntaxError"),
    "sandbox": (MARKER_ESCAPE, "SecurityError"),
    "raise": ("{{ raise_exception('roles must alternate') }}", "TemplateError: roles must alternate"),
    "type": ("{{ 1 + messages[0].content }}", "TypeError"),
    "undefined": ("{{ messages[7].content.upper() }}", "UndefinedError"),
}


@pytest.mark.parametrize("kind", sorted(BROKEN))
def test_infer_chat_with_a_broken_template_in_the_folder_is_exit_2(tiny, tmp_path, kind):
    template, message = BROKEN[kind]
    model = with_template(tiny, tmp_path / "m", template.replace("MARKER", str(tmp_path / "marker")))
    before = snapshot(model)
    run = cli("infer", "-m", model, "-p", "hi", "--chat", "-o", tmp_path / "r.json", "--device", "cpu",
              "--max-new-tokens", "1", cwd=tmp_path, installed=kind == "sandbox")
    one_error(run, f"{model}/chat_template.jinja", message)
    assert not (tmp_path / "r.json").exists() and not (tmp_path / "marker").exists()
    assert snapshot(model) == before


@pytest.mark.parametrize("template, message", [
    ("{{ raise_exception('no system role') }}", "TemplateError: no system role"),
    (42, "is not a string but int"),
    ({"tool_use": "{{ messages }}"}, "no usable chat template"),
])
def test_infer_chat_with_a_broken_tokenizer_config_template_is_exit_2(tiny, tmp_path, template, message):
    model = with_template(tiny, tmp_path / "m", template, where="config")
    run = cli("infer", "-m", model, "-p", "hi", "--chat", "-o", tmp_path / "r.json", "--device", "cpu",
              "--max-new-tokens", "1", installed=template == 42)
    one_error(run, f"{model}/tokenizer_config.json's chat_template", message)
    assert not (tmp_path / "r.json").exists()


def test_a_malformed_template_list_in_tokenizer_config_is_exit_2(tiny, tmp_path):
    model = with_template(tiny, tmp_path / "m", [{"template": "{{ messages }}"}], where="config")
    run = cli("infer", "-m", model, "-p", "hi", "--chat", "-o", tmp_path / "r.json", "--device", "cpu",
              installed=False)
    one_error(run, "tokenizer_config.json's chat_template is a list")


def test_a_broken_template_fails_before_the_model_loads(tiny, tmp_path, invoke, monkeypatch):
    import bitcpm_cli.core.engines.hf as hf_engine

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(hf_engine, "load_for_inference", never)
    model = with_template(tiny, tmp_path / "m", BROKEN["syntax"][0])
    result = invoke("infer", "-m", model, "-p", "hi", "--chat", "-o", tmp_path / "r.json", "--device", "cpu")
    assert result.exit_code == 2 and result.stderr.startswith("error: the chat template from"), result.output


@pytest.mark.parametrize("kind", ["syntax", "sandbox", "raise", "type", "undefined"])
def test_sft_template_file_that_fails_is_exit_2(tiny, tmp_path, kind):
    template, message = BROKEN[kind]
    (tmp_path / "t.jinja").write_text(template.replace("MARKER", str(tmp_path / "marker")))
    run = cli("sft", "-m", tiny / "fused", "--data", tiny / "chat.jsonl", "--template", tmp_path / "t.jinja",
              "--preview", "1", cwd=tmp_path, installed=kind == "raise")
    one_error(run, f"--template {tmp_path / 't.jinja'}", message)
    assert not (tmp_path / "marker").exists()


def test_sft_training_with_a_broken_auto_template_writes_nothing(tiny, tmp_path):
    model = with_template(tiny, tmp_path / "m", BROKEN["raise"][0], where="config")
    before = snapshot(model)
    run = bitcpm_script("sft", "-m", model, "--data", tiny / "chat.jsonl", "--template", "auto", "-o",
                        tmp_path / "run", "--max-steps", "1", "--device", "cpu")
    one_error(run, f"{model}/tokenizer_config.json's chat_template", "roles must alternate")
    assert not (tmp_path / "run").exists() and snapshot(model) == before


def test_sft_preview_template_failing_on_the_data_is_exit_2(tiny, tmp_path, invoke):
    """A template that compiles but raises for some conversation (here: any assistant turn) fails while rendering."""
    (tmp_path / "t.jinja").write_text("{% for m in messages %}{% if m.role == 'assistant' %}"
                                      "{{ raise_exception('assistant at ' ~ loop.index) }}{% endif %}{% endfor %}")
    result = invoke("sft", "-m", tiny / "fused", "--data", tiny / "chat.jsonl", "--template", tmp_path / "t.jinja",
                    "--preview", "1")
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith(f"error: the chat template from --template {tmp_path / 't.jinja'} failed at "
                                    "line 1: TemplateError: assistant at 2")


def test_infer_logprobs_beyond_the_vocabulary_is_exit_2(tiny, tmp_path):
    run = bitcpm_script("infer", "-m", tiny / "fused", "-p", "hi", "-o", tmp_path / "r.json", "--device", "cpu",
                        "--max-new-tokens", "1", "--logprobs", "97")
    one_error(run, "--logprobs 97", "vocabulary of 96 tokens")
    assert not (tmp_path / "r.json").exists()


def test_infer_logprobs_at_the_vocabulary_and_negative(tiny, tmp_path, invoke):
    result = invoke("infer", "-m", tiny / "fused", "-p", "hi", "-o", tmp_path / "r.json", "--device", "cpu",
                    "--max-new-tokens", "1", "--logprobs", "96", "-q")
    assert result.exit_code == 0, result.output
    assert len(json.loads((tmp_path / "r.json").read_text())["results"][0]["top_logprobs"][0]) == 96
    result = invoke("infer", "-m", tiny / "fused", "-p", "hi", "-o", tmp_path / "n.json", "--logprobs", "-1")
    assert result.exit_code == 2 and "--logprobs -1: must be at least 0" in result.stderr
    assert not (tmp_path / "n.json").exists()


def test_infer_engine_hf_on_a_gguf_file_names_llama_cpp(tmp_path):
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    run = bitcpm_script("infer", "--engine", "hf", "-m", tmp_path / "m.gguf", "-p", "hi", "-o", tmp_path / "r.json")
    line = one_error(run, f"{tmp_path / 'm.gguf'} is a GGUF file")
    assert "not found" not in line and "--engine llama.cpp" in run.stderr.splitlines()[-1]


# ---- config.json model_type ------------------------------------------------------------------------------------
def with_model_type(tiny: Path, folder: Path, model_type, auto_map: dict | None = None) -> Path:
    shutil.copytree(tiny / "fused", folder)
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = model_type
    if auto_map is not None:
        config["auto_map"] = auto_map
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("command", ["infer", "eval", "train"])
@pytest.mark.parametrize("trust", [False, True])
def test_unknown_model_type_is_exit_2_in_every_command(tiny, tmp_path, command, trust):
    model = with_model_type(tiny, tmp_path / "m", "llamma")
    (tmp_path / "text.txt").write_text("hello world, a few words to read. " * 60)
    before = snapshot(model)
    args = {"infer": ["-p", "hi", "-o", tmp_path / "out"],
            "eval": ["--data", tmp_path / "text.txt", "--context", "64", "-o", tmp_path / "out"],
            "train": ["--data", tmp_path / "text.txt", "--block-size", "16", "--max-steps", "1", "-o",
                      tmp_path / "out"]}[command]
    run = cli(command, "-m", model, *args, "--device", "cpu", *(["--trust-remote-code"] if trust else []),
              installed=command == "infer" and not trust)
    one_error(run, f"{model}/config.json", "model_type 'llamma'", "did you mean 'llama'?")
    assert "--trust-remote-code" in run.stderr.splitlines()[-1]
    assert not (tmp_path / "out").exists() and snapshot(model) == before


def test_auto_map_without_the_code_is_exit_2(tiny, tmp_path, invoke):
    model = with_model_type(tiny, tmp_path / "m", "foo", {"AutoConfig": "configuration_foo.FooConfig",
                                                           "AutoModelForCausalLM": "modeling_foo.FooForCausalLM"})
    result = invoke("infer", "-m", model, "-p", "hi", "-o", tmp_path / "r.json", "--trust-remote-code")
    assert result.exit_code == 2, result.output
    assert "configuration_foo.py, modeling_foo.py are not in" in result.stderr.splitlines()[0]


def test_known_config_without_a_causal_lm_is_exit_2(tiny, tmp_path, invoke):
    model = with_model_type(tiny, tmp_path / "m", "vit")
    result = invoke("infer", "-m", model, "-p", "hi", "-o", tmp_path / "r.json")
    assert result.exit_code == 2, result.output
    assert "model_type 'vit'" in result.stderr and "no causal language model" in result.stderr


# ---- the llama.cpp engine --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bad_gguf(tmp_path_factory) -> Path:
    if importlib.util.find_spec("gguf") is None or importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("the llama.cpp engine needs the gguf extra (gguf, llama-cpp-python)")
    from bitcpm_cli.core.conversion.gguf.export import export_gguf
    from tests.integration.test_gguf import qat_model

    root = tmp_path_factory.mktemp("gguf-chat")
    qat_model(root / "qat", group_size=-1)
    (root / "qat" / "chat_template.jinja").write_text("{{ raise_exception('no ' + messages[0].role) }}")
    export_gguf(root / "qat", root / "bad.gguf")
    return root / "bad.gguf"


def test_llamacpp_chat_with_a_failing_gguf_template_is_exit_2(bad_gguf, tmp_path):
    before = bad_gguf.read_bytes()
    run = bitcpm_script("infer", "-m", bad_gguf, "-p", "hi", "--chat", "-o", tmp_path / "r.json",
                        "--max-new-tokens", "1")
    one_error(run, f"{bad_gguf}'s tokenizer.chat_template", "TemplateError: no user")
    assert not (tmp_path / "r.json").exists() and bad_gguf.read_bytes() == before


def test_llamacpp_logprobs_beyond_the_vocabulary_is_exit_2_not_clamped(bad_gguf, tmp_path):
    run = bitcpm_script("infer", "-m", bad_gguf, "-p", "hi", "-o", tmp_path / "r.json", "--max-new-tokens", "1",
                        "--logprobs", "513")
    one_error(run, "--logprobs 513", "vocabulary of 512 tokens")
    assert not (tmp_path / "r.json").exists()


def test_a_template_that_renders_nothing_is_exit_2(tiny, tmp_path, invoke):
    """Found by the chat-template fuzz: `{{ 'ab' * 0 }}` renders an empty prompt, which transformers' generate()
    failed on (exit 3)."""
    model = with_template(tiny, tmp_path / "m", "{{ 'ab' * 0 }}")
    result = invoke("infer", "-m", str(model), "-p", "hi", "--chat", "-o", str(tmp_path / "r.json"), "--device", "cpu")
    assert result.exit_code == 2, result.output
    assert "prompt 0 encodes to no tokens (the chat template rendered an empty text)" in result.stderr
    assert not (tmp_path / "r.json").exists()
