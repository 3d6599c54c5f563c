"""Fuzz the chat template a model folder or `--template` gives: hostile Jinja (syntax errors, sandbox escapes,
`raise_exception`, loops and outputs bounded by size, values that are not templates at all) fed to `infer --chat`
(transformers engine, one tiny model built once: only the template changes) and to `sft --preview`.

Invariants for every run (issue #23 item 4): the exit code is 0, 1 or 2, no traceback and no "internal error", nothing
written when the command fails, every input byte-identical afterwards, and no escape attempt creates its marker file
(the sandbox holds). Bounded (a few dozen examples a command, no deadline) so the suite stays in the default run.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from bitcpm_cli.cli.app import app
from bitcpm_cli.core.model.chat import DEFAULT_CHAT_TEMPLATE
from tests.fuzz.hostile import snapshot
from tests.helpers import build_tiny_model, copy_with_chat_template

BOUNDED = settings(max_examples=30, deadline=None, database=None,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
RUNNER = CliRunner()
MARKER = "@MARKER@"  # replaced by the path of a file that must never be created

# ---- hostile templates -----------------------------------------------------------------------------------------
FRAGMENTS = ["{{", "}}", "{%", "%}", "{#", "#}", "for m in messages", "endfor", "if", "endif", "else", "m.content",
             "m['role']", "messages", "|", "upper", "(", ")", "[", "]", "'", '"', "~", "set x =", "macro f()",
             "endmacro", "loop.index", "raise_exception('x')", "namespace(", "tojson", "\n", " ", "x"]
syntax_soup = st.lists(st.sampled_from(FRAGMENTS), min_size=1, max_size=14).map("".join)

ESCAPES = [
    "{{ ''.__class__.__mro__ }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ ().__class__.__base__.__subclasses__() }}",
    "{% for c in [].__class__.__base__.__subclasses__() %}{{ c }}{% endfor %}",
    "{{ cycler.__init__.__globals__.os.system('touch @MARKER@') }}",
    "{{ joiner.__init__.__globals__['os'].popen('touch @MARKER@').read() }}",
    "{{ lipsum.__globals__['os'].system('touch @MARKER@') }}",
    "{{ raise_exception.__globals__['os'].system('touch @MARKER@') }}",
    "{{ strftime_now.__globals__['__builtins__']['open']('@MARKER@', 'w') }}",
    "{{ namespace.__init__.__globals__['os'].system('touch @MARKER@') }}",
    "{{ dict.__call__.__globals__ }}",
    "{{ messages.__class__.__init__.__globals__ }}",
    "{{ messages[0].__class__ }}{{ messages[0].update({'role': 'x'}) }}",
    "{{ messages.append({'role': 'user', 'content': 'x'}) }}",
    "{% set ns = namespace(_private=1) %}",
    "{% set ns = namespace() %}{% set ns.__class__ = 1 %}",
    "{{ self._TemplateReference__context }}",
    "{{ 'x'|attr('__class__') }}",
    "{{ messages|map(attribute='__class__')|list }}",
    "{{ tojson.__globals__['json'].__loader__ }}",
    "{{ (messages|first).items().__class__.__mro__ }}",
    "{% include '/etc/passwd' %}",
    "{% import 'os' as os %}{{ os.system('touch @MARKER@') }}",
    "{% extends '@MARKER@' %}",
    "{{ range.__self__.open('@MARKER@', 'w') }}",
    "{{ '{0.__class__}'.format('') }}",
    "{{ '%s'.format_map({}) }}",
]
escapes = st.sampled_from(ESCAPES)

raising = st.builds(lambda text, where: (
    "{% for m in messages %}{% if " + where + " %}{{ raise_exception(" + json.dumps(text) + ") }}{% endif %}"
    "{{ m.content }}{% endfor %}"),
    st.text(max_size=40), st.sampled_from(["true", "m.role == 'user'", "m.role == 'assistant'", "loop.last"]))

runtime_errors = st.sampled_from([
    "{{ 1 + messages[0].content }}", "{{ messages[9].content.upper() }}", "{{ 1 / 0 }}", "{{ '%s %s' % 1 }}",
    "{{ messages|map('nofilter')|list }}", "{{ none.foo() }}", "{{ messages[0].content|int(base=99) }}",
    "{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "{{ range(10**9)|list }}", "{{ messages|tojson(indent='x') }}",
    "{% generation %}{{ messages }}", "{{ strftime_now(1) }}",
])

# loops and outputs bounded by size: big enough to pass the tiny model's 256-token context, small enough to be quick
bounded_loops = st.builds(lambda outer, inner, text: (
    "{% for i in range(" + str(outer) + ") %}{% for j in range(" + str(inner) + ") %}" + text
    + "{% endfor %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"),
    st.integers(0, 400), st.integers(0, 400), st.sampled_from(["x", "<|im_start|>", "{{ i }}", ""]))
huge_outputs = st.builds(lambda count: "{{ 'ab' * " + str(count) + " }}", st.integers(0, 300_000))

# valid templates with a hostile piece appended
mixed = st.builds(lambda piece: DEFAULT_CHAT_TEMPLATE + piece, st.one_of(escapes, runtime_errors, syntax_soup))

hostile_templates = st.one_of(syntax_soup, escapes, raising, runtime_errors, bounded_loops, huge_outputs, mixed)

json_non_templates = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=6), st.one_of(st.text(max_size=10), st.integers()), max_size=3),
    st.lists(st.fixed_dictionaries({}, optional={"name": st.one_of(st.text(max_size=6), st.integers()),
                                                 "template": st.one_of(hostile_templates, st.integers())}),
             max_size=3),
)
STRATEGIES = 8  # syntax, escapes, raising, runtime errors, loops, huge outputs, mixed; values that are not templates


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = build_tiny_model(tmp_path_factory.mktemp("fuzz-chat") / "fused")
    (folder.parent / "chat.jsonl").write_text(json.dumps({"messages": [
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yo"}]}) + "\n")
    return folder


def place(model: Path, root: Path, template, where: str) -> Path:
    """A copy of the tiny model with `template` in chat_template.jinja or tokenizer_config.json's chat_template."""
    if isinstance(template, str):
        template = template.replace(MARKER, str(root / "marker"))
    return copy_with_chat_template(model, root / "in" / "m", template, where)


def run(*args, root: Path, output: Path | None = None):
    """Run one command on the files under root/in and assert the invariants."""
    inputs = root / "in"
    before = snapshot(inputs)
    result = RUNNER.invoke(app, [str(a) for a in args])
    text = result.output + (result.stderr or "")
    assert result.exit_code in (0, 1, 2), (args, text, result.exception)
    assert "Traceback" not in text and "internal error" not in text, text
    assert snapshot(inputs) == before, "an input changed"
    assert not (root / "marker").exists(), "a template escaped the sandbox"
    if result.exit_code == 2:
        assert [line for line in result.stderr.splitlines() if line.startswith("error:")], text
        assert output is None or not output.exists(), "a failed run wrote its output"
    return result


@BOUNDED
@given(st.one_of(hostile_templates.map(lambda t: (t, "jinja")), hostile_templates.map(lambda t: (t, "config")),
                 json_non_templates.map(lambda t: (t, "config"))))
def test_infer_chat_with_any_template(model, placed):
    template, where = placed
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        copy = place(model, root, template, where)
        out = root / "r.json"
        run("infer", "-m", copy, "-p", "hi", "--chat", "-o", out, "--device", "cpu", "--max-new-tokens", "1", "-q",
            root=root, output=out)


@BOUNDED
@given(st.one_of(hostile_templates.map(lambda t: (t, "jinja")), hostile_templates.map(lambda t: (t, "file")),
                 json_non_templates.map(lambda t: (t, "config"))))
def test_sft_preview_with_any_template(model, placed):
    template, where = placed
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        if where == "file":
            copy = place(model, root, "", "config")  # an empty template in the folder: --template wins
            (root / "in" / "t.jinja").write_text(template.replace(MARKER, str(root / "marker")))
            extra = ["--template", root / "in" / "t.jinja"]
        else:
            copy, extra = place(model, root, template, where), []
        shutil.copy(model.parent / "chat.jsonl", root / "in" / "chat.jsonl")
        run("sft", "-m", copy, "--data", root / "in" / "chat.jsonl", "--preview", "1", *extra, root=root)
