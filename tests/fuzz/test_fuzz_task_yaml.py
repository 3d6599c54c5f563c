"""Fuzz `bitcpm eval --tasks --include-path` with hostile lm-evaluation-harness task YAML files.

Invariants for every run: exit 0, 1 or 2 (never 3), no traceback, no code ran (the marker a `!function` module,
a Python tag or a Jinja2 template escaping its sandbox would write never appears without --trust-remote-code),
nothing written outside the run's folders, every input byte-identical.
"""

import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from bitcpm_cli.cli.app import app
from tests.fuzz.hostile import snapshot
from tests.helpers import build_tiny_model

pytest.importorskip("lm_eval", reason="--tasks needs the eval extra")
BOUNDED = settings(max_examples=25, deadline=None, database=None,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
RUNNER = CliRunner()
EVAL_TASKS = Path(__file__).resolve().parents[2] / "configs" / "eval"
TASK = (EVAL_TASKS / "counting.yaml").read_text()
KNOWN = ["doc_to_text", "doc_to_target", "num_fewshot", "test_split", "dataset_kwargs", "metric_list", "tag",
         "description", "repeats", "output_type", "unsafe_code", "dataset_path", "include", "class", "process_docs"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzztasks")
    build_tiny_model(root / "qat", kind="qat")
    (root / "t.txt").write_text("1 2 3 4 5 6 7 8\n")
    return root


tags = st.sampled_from(["!function utils.process_docs", "!function os.system", "!!python/object/apply:{mark} []",
                        "!!python/name:os.system", "!!python/module:os", "!evil x", "!function [a]", "!!binary aGk=",
                        "!!set {{a: null}}", "!!timestamp 2001-12-14"])
escapes = st.sampled_from(["../outside.yaml", "/etc/passwd", "{root}/outside.yaml", "../../../../../etc/passwd",
                           "link.yaml", "~/.bashrc", "file:///etc/passwd", "zip://x::{root}/outside.jsonl",
                           "*/../../outside.jsonl", "../*", "counting.jsonl", "sub/../counting.jsonl", "nope.jsonl",
                           "hf://datasets/org/name", "http://127.0.0.1:9/x.jsonl", "org/name", ".", "./counting.jsonl"])
# values the harness' types allow but it crashes on (each found by this fuzz once link.yaml stopped hiding them)
crashers = st.sampled_from(["test_split: null", "test_split: train", "validation_split: null", "doc_to_text: null",
                            "doc_to_target: null", "repeats: 0", "output_type: nope", "metric_list: []",
                            "metric_list: [0]", "metric_list: [{metric: null}]", "dataset_kwargs: null",
                            "dataset_kwargs: {}", "dataset_kwargs: {data_dir: .}", "class: !!binary aGk=",
                            "doc_to_choice: '{{ answer }}'", "doc_to_choice: '{{ context }}'"])
wrong = st.one_of(st.integers(), st.floats(allow_nan=True), st.booleans(), st.none(), st.text(max_size=8),
                  st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))

# Jinja2 templates that reach Python (lm-evaluation-harness renders doc_to_text & co. with Jinja2): without
# --trust-remote-code each is refused (up front, or by the sandbox while rendering) and its `touch` never runs
templates = st.sampled_from([
    "{{ cycler.__init__.__globals__.os.popen('touch {mark}').read() }}{{ context }}",
    "{{ cycler['__init__']['__globals__']['os'].popen('touch {mark}').read() }}{{ context }}",
    "{{ (joiner | attr('__init__') | attr('__globals__'))['os'].popen('touch {mark}').read() }}",
    "{{ lipsum['__globals__']['os'].popen('touch {mark}').read() }}",
    "{{ self.__init__.__globals__.__builtins__.__import__('os').popen('touch {mark}').read() }}",
    "{{ namespace['__init__']['__globals__']['os'].popen('touch {mark}').read() }}",
    ("{% for c in ''['__class__']['__mro__'][1]['__subclasses__']() %}{% if c['__name__'] == 'Popen' %}"
     "{{ c(['touch', '{mark}']).wait() }}{% endif %}{% endfor %}"),
    "{% set g = cycler['__init__'] %}{{ g['__globals__']['os'].system('touch {mark}') }}",
    "{{ '{0.__init__.__globals__}'.format(cycler) }}", "{{ choices.append('x') }}{{ context }}",
    "{{ context", "{% if %}", "{{ nope }}", "{% for x in choices %}", "{{ 1 / 0 }}", "{{ context }}",
])
template_fields = st.sampled_from(["doc_to_text", "doc_to_target", "doc_to_choice", "description", "gen_prefix",
                                   "fewshot_config: {doc_to_text"])


def template_line(field: str, template: str) -> str:
    import json

    return f"{field}: {json.dumps(template)}}}" if "{" in field else f"{field}: {json.dumps(template)}"


def bomb(depth: int, width: int) -> str:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * width)}]" for i in range(1, depth)]
    return "\n".join(lines) + "\n"


def yaml_scalar(value) -> str:
    import json
    import math

    return ".nan" if isinstance(value, float) and math.isnan(value) else json.dumps(value)


lines = st.one_of(
    st.tuples(st.sampled_from(KNOWN), tags).map(lambda kv: f"{kv[0]}: {kv[1]}"),
    escapes.map(lambda p: f"include: {p!r}"),
    escapes.map(lambda p: f"dataset_kwargs: {{data_files: {{test: {p!r}}}}}"),
    escapes.map(lambda p: f"dataset_kwargs: {{data_files: [{p!r}]}}"),
    escapes.map(lambda p: f"dataset_kwargs: {{data_dir: {p!r}}}"),
    escapes.map(lambda p: f"dataset_path: {p!r}"),
    st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=12).map(lambda k: f"{k}x_: 1"),
    st.tuples(st.sampled_from(KNOWN[:6]), wrong).map(lambda kv: f"{kv[0]}: {yaml_scalar(kv[1])}"),
    st.tuples(st.integers(2, 9), st.integers(2, 12)).map(lambda dw: bomb(*dw) + "x: *a" + str(dw[0] - 1)),
    st.tuples(template_fields, templates).map(lambda ft: template_line(*ft)),
    st.sampled_from(["- a list", "just text", "", "&a [*a]", "x: &a [*a]", "{", "\t\x00", "? [a]\n: b"]),
    crashers,
)


@BOUNDED
@given(st.lists(lines, min_size=1, max_size=3), st.booleans())
def test_hostile_task_yaml(model, extra, trusted):
    """Hostile lines on counting.yaml; link.yaml (a symlink out of the folder) exists only when a line names it, so
    every other line is checked on its own rather than refused for the link."""
    check_run(model, extra, trusted, link=any("link.yaml" in line for line in extra))


@BOUNDED
@given(st.lists(st.tuples(template_fields, templates).map(lambda ft: template_line(*ft)), min_size=1, max_size=2),
       st.booleans())
def test_hostile_task_templates(model, extra, trusted):
    """Only template lines: each escape is refused (exit 2, no marker) unless --trust-remote-code."""
    check_run(model, extra, trusted)


def check_run(model, extra: list[str], trusted: bool, link: bool = False) -> None:
    """One `bitcpm eval` run on counting.yaml plus `extra` lines, and the module's invariants. `link`: the folder
    holds link.yaml, a symlink to a file outside it (indexed as a task file, so such a run is refused)."""
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        folder, marker = root / "tasks", root / "marker"
        folder.mkdir()
        shutil.copy(EVAL_TASKS / "counting.jsonl", folder / "counting.jsonl")
        shutil.copy(EVAL_TASKS / "counting.jsonl", root / "outside.jsonl")
        (root / "outside.yaml").write_text("output_type: multiple_choice\n")
        if link:
            (folder / "link.yaml").symlink_to(root / "outside.yaml")
        (folder / "utils.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n"
                                         "def process_docs(dataset):\n    return dataset\n")
        body = "\n".join(line.replace("{mark}", str(marker)).replace("{root}", str(root)) for line in extra)
        (folder / "counting.yaml").write_text(TASK + body + "\n")
        before, outside = snapshot(folder), snapshot(root)
        args = ["eval", "-m", model / "qat", "--data", model / "t.txt", "--context", "16", "--device", "cpu",
                "--tasks", "bitcpm_counting", "--include-path", folder] + (["--trust-remote-code"] if trusted else [])
        result = invoke_with_tempdir(args, root / "tmp")
        # code the user let run (a `!function`, a template rendered unsandboxed) may itself fail (exit 3)
        opted_in = trusted and ("!function" in body or "touch" in body or ".append(" in body)
        assert result.exit_code in (0, 1, 2) or opted_in, (body, result.output, result.exception)
        assert "Traceback" not in result.output, (body, result.output)
        assert "internal error" not in result.output or opted_in, (body, result.output)
        if result.exit_code == 2:  # one error line (after lm_eval's progress bars when it failed while running)
            pieces = result.output.replace("\r", "\n").splitlines()
            assert sum(piece.startswith("error:") for piece in pieces) == 1, result.output
        ran_templates = trusted and "touch" in body  # templates the user let render unsandboxed may run first
        if not trusted or result.exit_code == 2 and not ran_templates:
            assert not marker.exists(), body
        assert snapshot(folder) == before, "an input changed"
        after = snapshot(root)
        new = {key for key in set(after) - set(outside) - {"marker"} if key.split("/")[0] != "tmp"}
        assert not new, new  # nothing written outside
        assert not list((root / "tmp").glob("bitcpm-datasets-*"))  # the temporary datasets cache is gone


def invoke_with_tempdir(args: list, scratch: Path):
    """The CLI run with Python's temporary folder set to `scratch` (this run's own, so a leftover datasets cache is
    seen there, not confused with another process' in the shared /tmp), put back afterwards."""
    scratch.mkdir()
    saved, tempfile.tempdir = tempfile.tempdir, str(scratch)
    try:
        return RUNNER.invoke(app, [str(a) for a in args])
    finally:
        tempfile.tempdir = saved
