"""`bitcpm eval --tasks T --include-path DIR`: task YAML files run no code without --trust-remote-code, stay inside
DIR, hold only keys the harness knows, and the datasets cache they fill never lands in the user's home."""

import os
import shutil
from pathlib import Path

import pytest

from tests.fuzz.hostile import snapshot
from tests.helpers import bitcpm_in_process, bitcpm_script, build_tiny_model

pytest.importorskip("lm_eval", reason="--tasks needs the eval extra")
EVAL_TASKS = Path(__file__).resolve().parents[2] / "configs" / "eval"
TASK = (EVAL_TASKS / "counting.yaml").read_text()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("tasksafety")
    build_tiny_model(root / "qat", kind="qat")
    (root / "t.txt").write_text("1 2 3 4 5 6 7 8\nthe quick brown fox\n")
    return root


def task_folder(root: Path, yaml_text: str = TASK, name: str = "counting.yaml") -> Path:
    folder = root / "tasks"
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(EVAL_TASKS / "counting.jsonl", folder / "counting.jsonl")
    (folder / name).write_text(yaml_text)
    return folder


def eval_args(models: Path, folder: Path, *extra) -> list:
    return ["eval", "-m", models / "qat", "--data", models / "t.txt", "--context", "16", "--device", "cpu",
            "--tasks", "bitcpm_counting", "--include-path", folder, *extra]


def refused(invoke, models, folder, *needles, extra=()):
    """Exit 2, one `error:` line naming the file and each needle, a hint, no traceback, the folder unchanged."""
    before = snapshot(folder.parent)
    result = invoke(*eval_args(models, folder, *extra))
    text = result.output
    assert result.exit_code == 2, text
    lines = text.strip().splitlines()
    assert lines[0].startswith("error: ") and sum(line.startswith("error:") for line in lines) == 1, text
    assert lines[-1].startswith("hint: ") and "Traceback" not in text, text
    for needle in needles:
        assert needle in lines[0], text
    assert snapshot(folder.parent) == before
    return lines[0]


def test_function_tag_needs_trust_remote_code(models, tmp_path):
    """Without --trust-remote-code the `!function` module is not imported (exit 2 naming the file and the tag);
    with it, the task runs and its code did run."""
    marker = tmp_path / "ran"
    folder = task_folder(tmp_path, TASK + "process_docs: !function utils.process_docs\n")
    (folder / "utils.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n"
                                     "def process_docs(dataset):\n    return dataset\n")
    before = snapshot(folder)
    run = bitcpm_script(*eval_args(models, folder))
    lines = run.stderr.splitlines()
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
    assert lines[0].startswith("error: task file ") and "counting.yaml" in lines[0] and "!function" in lines[0]
    assert lines[-1].startswith("hint: ") and "--trust-remote-code" in lines[-1]
    assert not marker.exists() and snapshot(folder) == before
    run = bitcpm_script(*eval_args(models, folder, "--trust-remote-code", "--json"))
    assert run.returncode == 0, run.stderr
    assert marker.exists()


@pytest.mark.parametrize("line, needle", [
    ("process_docs: !!python/object/apply:os.system ['touch {marker}']", "python/object/apply"),
    ("doc_to_text: !!python/name:os.system", "python/name"),
    ("doc_to_text: !custom x", "!custom"),
    ("class: !function utils.Task", "!function"),
    ("unsafe_code: true", "unsafe_code"),
    ("metric_list: [{metric: ./evil.py, aggregation: mean, higher_is_better: true}]", "evaluate"),
])
def test_code_and_unknown_tags_refused(models, invoke, tmp_path, line, needle):
    marker = tmp_path / "ran"
    folder = task_folder(tmp_path, TASK + line.replace("{marker}", str(marker)) + "\n")
    if "metric_list" in line:
        (folder / "counting.yaml").write_text(TASK.split("metric_list:")[0] + line + "\n")
    refused(invoke, models, folder, "counting.yaml", needle)
    assert not marker.exists()


@pytest.mark.parametrize("setting, needle", [
    ("include: ../outside.yaml", "include"),
    ("include: {outside}", "include"),
    ("include: [ok.yaml, ../../outside.yaml]", "include"),
    ("dataset_kwargs: {{data_files: ../outside.jsonl}}", "data_files"),
    ("dataset_kwargs: {{data_files: [counting.jsonl, ../../../../etc/passwd]}}", "data_files"),
    ("dataset_kwargs: {{data_files: {{test: [../outside.jsonl]}}}}", "data_files"),
    ("dataset_kwargs: {{data_files: {{test: link.jsonl}}}}", "data_files"),
    ("dataset_kwargs: {{data_files: {{test: 'file:///etc/passwd'}}}}", "not a local path"),
    ("dataset_kwargs: {{data_dir: .., data_files: {{test: outside.jsonl}}}}", "data_dir"),
    ("dataset_kwargs: {{data_files: {{test: counting.jsonl}}, cache_dir: /tmp}}", "cache_dir"),
    ("dataset_path: {parent}", "dataset_path"),
])
def test_paths_stay_inside_the_include_path(models, invoke, tmp_path, setting, needle):
    outside = tmp_path / "outside.jsonl"
    shutil.copy(EVAL_TASKS / "counting.jsonl", outside)
    (tmp_path / "outside.yaml").write_text("output_type: multiple_choice\n")
    text = TASK.replace("dataset_kwargs:\n  data_files:\n    test: counting.jsonl\n", "")
    if "dataset_path" in setting:
        text = text.replace("dataset_path: json\n", "")
    folder = task_folder(tmp_path, text + setting.format(outside=tmp_path / "outside.yaml", parent=tmp_path) + "\n")
    (folder / "ok.yaml").write_text("output_type: multiple_choice\n")
    (folder / "link.jsonl").symlink_to(outside)
    refused(invoke, models, folder, "counting.yaml", needle,
            "cache" if needle == "cache_dir" else "--include-path")


@pytest.mark.parametrize("content, needle", [
    (TASK.replace("doc_to_text:", "doc_to_txt:"), "did you mean 'doc_to_text'"),
    (TASK + "num_fewshot: many\n", "num_fewshot"),
    ("a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 10)}]\n" for i in range(7))
     + TASK, "alias"),
    ("- just\n- a list\n", "not a mapping"),
    (b"task: bitcpm_counting\ndoc_to_text: \xff\xfe\n", "not UTF-8"),
    ("task: bitcpm_counting\nx: " + "y" * (1 << 21) + "\n", "bytes"),
    ("task: [unclosed\n", "line"),
])
def test_broken_task_files_are_one_error(models, invoke, tmp_path, content, needle):
    folder = task_folder(tmp_path)
    target = folder / ("counting.yaml" if needle != "not a mapping" else "other.yaml")
    target.write_bytes(content if isinstance(content, bytes) else content.encode())
    line = refused(invoke, models, folder, target.name, needle)
    assert len(line) < 400


def test_datasets_cache_stays_out_of_home_and_is_removed(models, tmp_path):
    """HOME, XDG_CACHE_HOME and HF_HOME point at a fake home: the run scores the task and nothing appears there; the
    temporary cache folder is gone afterwards. With HF_DATASETS_CACHE set, the cache goes there."""
    home, scratch, own = tmp_path / "home", tmp_path / "tmp", tmp_path / "own-cache"
    for folder in (home, scratch):
        folder.mkdir()
    folder = task_folder(tmp_path)
    env = {"HOME": str(home), "XDG_CACHE_HOME": str(home / ".cache"), "HF_HOME": str(home / ".cache" / "hf"),
           "TMPDIR": str(scratch)}
    run = bitcpm_script(*eval_args(models, folder, "--json"), env=env, unset=("BITCPM_DEBUG", "HF_DATASETS_CACHE"))
    assert run.returncode == 0, run.stderr
    assert not [p for p in home.rglob("*") if "datasets" in p.name], sorted(home.rglob("*"))
    assert not list(scratch.glob("bitcpm-datasets-*"))
    run = bitcpm_script(*eval_args(models, folder, "--json"), env={**env, "HF_DATASETS_CACHE": str(own)})
    assert run.returncode == 0, run.stderr
    assert any(own.rglob("*.arrow")) and not [p for p in home.rglob("*") if "datasets" in p.name]


def test_counting_needs_no_trust_and_keeps_working(tmp_path):
    from lm_eval.tasks import TaskManager

    from bitcpm_cli.core.evaluation.tasks import resolve_tasks

    harness = resolve_tasks(["bitcpm_counting"], EVAL_TASKS)
    assert isinstance(harness.manager, TaskManager) and harness.configs == ["bitcpm_counting"]
    files = harness.checked["bitcpm_counting"].file.config["dataset_kwargs"]["data_files"]
    assert files == {"test": os.path.realpath(EVAL_TASKS / "counting.jsonl")}


# ---- templates: lm-evaluation-harness renders doc_to_text & co. with Jinja2, sandboxed unless trusted ------------
ESCAPES = ["{{{{ cycler.__init__.__globals__.os.popen('touch {marker}').read() }}}}{{{{context}}}}",  # refused early
           "{{{{ cycler['__init__']['__globals__']['os'].popen('touch {marker}').read() }}}}{{{{context}}}}"]


def template_task(template: str, field: str = "doc_to_text") -> str:
    """counting.yaml with `field` (doc_to_text, doc_to_choice or doc_to_target) set to `template`."""
    import json

    column = {"doc_to_text": "context", "doc_to_choice": "choices", "doc_to_target": "answer"}[field]
    return TASK.replace(f"{field}: {column}", f"{field}: {json.dumps(template)}")  # a YAML string


@pytest.mark.parametrize("escape", ESCAPES, ids=["attribute", "item"])
def test_template_escape_needs_trust_remote_code(models, tmp_path, escape):
    """A doc_to_text that reaches Python through the template's globals runs nothing without --trust-remote-code
    (exit 2 naming the file, the task and the field: refused before the model loads when its dunder attributes show,
    by the sandbox while rendering otherwise); with it, lm-evaluation-harness' own unsandboxed rendering runs it.
    The attribute escape runs through the installed script, the item escape in-process (the same command)."""
    marker = tmp_path / "ran"
    folder = task_folder(tmp_path, template_task(escape.format(marker=marker)))
    before = snapshot(folder)
    bitcpm = bitcpm_script if escape == ESCAPES[0] else bitcpm_in_process
    run = bitcpm(*eval_args(models, folder))
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
    assert lines[0].startswith("error: task file ") and sum(line.startswith("error:") for line in lines) == 1
    for needle in ("counting.yaml", "task bitcpm_counting", "doc_to_text", "refused by the template sandbox",
                   "__init__"):
        assert needle in lines[0], run.stderr
    assert lines[-1].startswith("hint: ") and "--trust-remote-code" in lines[-1], run.stderr
    assert not marker.exists() and snapshot(folder) == before
    run = bitcpm(*eval_args(models, folder, "--trust-remote-code", "--json"))
    assert run.returncode == 0, run.stderr
    assert marker.exists()


@pytest.mark.parametrize("field, template, needle", [
    ("doc_to_text", "{{ context ", "is not a valid template"),
    ("doc_to_text", "{% for x in choices %}{{ x }}", "is not a valid template"),
    ("doc_to_text", "{{ contxt }}", "'contxt' is undefined"),
    ("doc_to_text", "{{ choices.append('1') }}{{ context }}", "refused by the template sandbox"),
    ("doc_to_text", "{{ context | regex_replace('(', '') }}", "failed to render"),
    ("doc_to_target", "{{ answer / 0 }}", "division by zero"),
    ("doc_to_choice", "{{ context }}", "not a Python literal"),
])
def test_broken_templates_are_one_error(models, invoke, tmp_path, field, template, needle):
    """A template that does not compile, or fails while rendering (also one whose doc_to_choice is no list, which
    the harness would crash on), is one error naming the file, the task and the field."""
    folder = task_folder(tmp_path, template_task(template, field))
    refused(invoke, models, folder, "counting.yaml", "task bitcpm_counting", field, needle)


def test_templated_counting_scores_as_the_plain_one(models, tmp_path):
    """The counting task written as lm-evaluation-harness templates ({{context}}, a filtered doc_to_text, the choices
    rendered as a list, the answer as a number) scores exactly as the plain one under the sandbox."""
    import json

    plain = bitcpm_in_process(*eval_args(models, task_folder(tmp_path / "plain"), "--json"))
    text = TASK.replace("doc_to_text: context", "doc_to_text: \"{{ context | regex_replace('  +', ' ') }}\"")
    text = text.replace("doc_to_choice: choices", "doc_to_choice: '{{ choices }}'")
    text = text.replace("doc_to_target: answer", "doc_to_target: '{% for c in choices %}{% if loop.index0 == answer "
                                                 "%}{{ loop.index0 }}{% endif %}{% endfor %}'")
    templated = bitcpm_in_process(*eval_args(models, task_folder(tmp_path / "templated", text), "--json"))
    assert plain.returncode == 0 and templated.returncode == 0, plain.stderr + templated.stderr
    scores = [json.loads(run.stdout)["models"][0]["tasks"] for run in (plain, templated)]
    assert scores[0] == scores[1] and "acc" in scores[0]["bitcpm_counting"], scores


def test_templates_render_as_lm_eval_renders_them_and_the_env_is_put_back():
    """Every template below renders the same under bitcpm's sandbox as under lm_eval's own environment (its
    regex_replace filter included); lm_eval's environment is back afterwards, also after a refusal."""
    import lm_eval.utils

    from bitcpm_cli.core.errors import InputError
    from bitcpm_cli.core.evaluation.tasks import task_templates

    doc = {"question": "What is 2+2?", "choices": ["3", "4", "5"], "label": 1, "text": "  Hello  World ",
           "n": 3.14159, "items": [{"k": "a", "v": 1}, {"k": "b", "v": 2}]}
    templates = [
        "{{question}}", "Q: {{question}}\nA:", "{{choices[0]}}", "{{choices[label]}}", "{{ ['A', 'B', 'C'][label] }}",
        "{% for c in choices %}{{ loop.index }}. {{ c }}\n{% endfor %}", "{{ text | regex_replace('[ ]+', ' ') }}",
        "{{ text.strip() }}", "{{ choices | join(', ') }}", "{{ '%.2f' | format(n) }}", "{{ '{:.3f}'.format(n) }}",
        "{% set ns = namespace(c=0) %}{% for i in items %}{% set ns.c = ns.c + i.v %}{% endfor %}{{ ns.c }}",
        "{{ items | map(attribute='k') | join }}", "{{ question | upper }}{{ label + 1 }}", "{{ choices }}",
        "{{ range(3) | list }}", "{{ text | trim | lower | replace('world', 'x') }}", "trailing newline\n",
        "{{ question[:4] }}{{ question | length }}", "{{ items[0]['k'] }}{{ items[1].v }}",
        "{{ 'yes' if label == 1 else 'no' }}", "{{ text.replace(' ', '_').split('_') | select | list }}",
    ]
    original = lm_eval.utils.env
    expected = [lm_eval.utils.apply_template(template, doc) for template in templates]
    with task_templates({}, trusted=False):
        assert lm_eval.utils.env is not original
        assert [lm_eval.utils.apply_template(template, doc) for template in templates] == expected
    assert lm_eval.utils.env is original
    with pytest.raises(InputError, match="refused by the template sandbox"), task_templates({}, trusted=False):
        lm_eval.utils.apply_template("{{ cycler.__init__.__globals__ }}", doc)
    assert lm_eval.utils.env is original


# ---- what the harness would crash on (found by tests/fuzz/test_fuzz_task_yaml.py): one error naming file and key --
@pytest.mark.parametrize("lines, needle", [
    (["dataset_path: 'file:///etc/passwd'"], "is a URL"),  # a URL: datasets crashed (FileNotFoundError)
    (["dataset_path: 'hf://datasets/org/name'"], "is a URL"),
    (["dataset_path: 'http://example.com/data.jsonl'"], "is a URL"),
    (["dataset_path: nope.jsonl"], "local Hugging Face cache"),  # a Hub id offline, not cached
    (["dataset_path: ./tasks/counting.jsonl"], "not a dataset folder"),  # a file, not a folder
    (["dataset_kwargs: null"], "needs dataset_kwargs.data_files"),  # json would read the working directory
    (["dataset_kwargs: {data_files: [counting.jsonl]}"], "test_split: 'test' is not a split"),  # KeyError 'test'
    (["dataset_kwargs: {data_dir: .}", "test_split: train"], "could not be read: JSON parse error"),  # the yaml
    (["test_split: null"], "neither test_split nor validation_split"),
    (["doc_to_text: null"], "doc_to_text: null"),  # TypeError (and a stray print) in the harness
    (["class: !!binary aGk="], "class: b'hi' is not a `!function"),
    (["output_type: x"], "output_type: 'x'"),
    (["repeats: 0"], "repeats: 0"),  # IndexError in the harness' filters
    (["metric_list: []"], "metric_list: an empty list"),  # StopIteration rendering the scores
    (["metric_list: [0]"], "metric_list: 0"),
    (['doc_to_text: "{{ context }}"', 'doc_to_choice: "{{ context }}"'], "doc_to_choice failed to render"),
    (['doc_to_choice: "{{ answer }}"'], "not a list of choices"),  # TypeError: 'int' object is not subscriptable
])
@pytest.mark.parametrize("trusted", [False, True], ids=["untrusted", "trusted"])
def test_task_values_the_harness_crashes_on_are_one_error(models, invoke, tmp_path, monkeypatch, lines, needle,
                                                         trusted):
    """Each value lm-evaluation-harness (or datasets) would crash on is exit 2 naming the file and the key, with or
    without --trust-remote-code (before: exit 3, an internal error)."""
    monkeypatch.chdir(tmp_path)  # a relative dataset_path is read from the working directory, as the harness reads it
    folder = task_folder(tmp_path, TASK + "\n".join(lines) + "\n")
    refused(invoke, models, folder, "counting.yaml", needle, extra=("--trust-remote-code",) if trusted else ())


def test_dataset_path_folder_inside_is_loaded_from_its_absolute_path(tmp_path, monkeypatch):
    """A local dataset folder inside --include-path (relative to the working directory, as datasets reads it) is
    kept, made absolute, so the harness loads exactly the checked folder."""
    from bitcpm_cli.core.evaluation.task_files import check_tasks

    folder = task_folder(tmp_path, TASK.replace("dataset_path: json\n", "dataset_path: tasks/data\n")
                         .replace("dataset_kwargs:\n  data_files:\n    test: counting.jsonl\n", ""))
    (folder / "data").mkdir()
    shutil.copy(EVAL_TASKS / "counting.jsonl", folder / "data" / "test.jsonl")
    monkeypatch.chdir(tmp_path)
    config = check_tasks(["bitcpm_counting"], folder, trusted=False)["bitcpm_counting"].file.config
    assert config["dataset_path"] == os.path.realpath(folder / "data")


def test_more_few_shot_examples_than_the_data_holds_is_one_error(models, invoke, tmp_path):
    """Known only once the data is read: lm_eval's sampler raised ValueError (exit 3)."""
    folder = task_folder(tmp_path, TASK + "num_fewshot: 1000\n")
    refused(invoke, models, folder, "num_fewshot in", "counting.yaml", "more few-shot examples than")
