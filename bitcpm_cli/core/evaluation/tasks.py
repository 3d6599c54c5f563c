"""`bitcpm eval --tasks`: lm-evaluation-harness tasks, run offline on local task YAML files through bitcpm's engines.
"""

from __future__ import annotations

import contextvars
import functools
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

from bitcpm_cli.core.errors import InputError


class Harness(NamedTuple):
    """What `resolve_tasks` hands `run_tasks`: lm_eval's TaskManager (its --include-path entries replaced by the
    checked configs), the task names, and the checked configs themselves (the datasets cache goes into them)."""

    manager: Any
    configs: list[Any]
    checked: dict[str, Any]
    trusted: bool


def resolve_tasks(tasks: list[str], include_path: str | Path | None,
                  trust_remote_code: bool = False) -> Harness:
    """The tasks, offline, checked before any model loads: unknown task names are refused, and every task file under
    --include-path they use is read safely and checked (task_files.py: no code without --trust-remote-code, data
    and includes inside the folder, only keys the harness knows)."""
    import importlib.util

    if importlib.util.find_spec("lm_eval") is None:
        raise InputError("--tasks needs lm-evaluation-harness", hint="pip install -e '.[eval]'")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from bitcpm_cli.core.evaluation.task_files import check_tasks

    with quiet_harness():
        checked = check_tasks(tasks, Path(include_path), trust_remote_code) if include_path else {}
        compile_templates(checked, trust_remote_code)  # a broken template is refused before any model loads
        from lm_eval.tasks import TaskManager

        # with --include-path only its tasks are indexed (the harness' own tasks download their data); the index
        # reads each file with a safe loader and leaves `!function` unimported
        with task_templates(checked, trust_remote_code):
            manager = TaskManager(include_path=str(include_path) if include_path else None,
                                  include_defaults=include_path is None)
        unknown = [t for t in tasks if t not in manager.all_tasks]
        if unknown:
            raise InputError(f"unknown task(s): {', '.join(unknown)}", hint="name tasks defined by YAML files in "
                                                                            "--include-path (or lm_eval's own)")
        _install_checked(manager, checked, trust_remote_code)
        return Harness(manager, list(tasks), checked, trust_remote_code)


def _install_checked(manager, checked: dict[str, Any], trusted: bool) -> None:
    """The harness builds each used entry from its checked config instead of reading the file again (with
    --trust-remote-code, `!function` values imported here as lm_eval imports them)."""
    from bitcpm_cli.core.evaluation.task_files import FunctionRef

    for name, entry in checked.items():
        target = manager._index.get(name)
        if target is None or entry.file is None:
            continue
        config = entry.file.config
        if trusted:
            import sys

            writes, sys.dont_write_bytecode = sys.dont_write_bytecode, True  # no __pycache__ in the input folder
            try:
                config = _resolve_functions(config, FunctionRef)
            finally:
                sys.dont_write_bytecode = writes
            entry.file.config = config
        target.cfg, target.yaml_path = config, None


def _resolve_functions(value: Any, ref_type: type) -> Any:
    """`value` with each recorded `!function` imported by lm_eval's own resolver (only with --trust-remote-code)."""
    from lm_eval.tasks._yaml_loader import _import_func_in_yml

    if isinstance(value, ref_type):
        return _import_func_in_yml(value.spec, value.base)
    if isinstance(value, dict):
        return {key: _resolve_functions(item, ref_type) for key, item in value.items()}
    if isinstance(value, list):
        return [_resolve_functions(item, ref_type) for item in value]
    return value


@contextmanager
def quiet_harness() -> Iterator[None]:
    """datasets' progress bars off, lm-evaluation-harness' loggers at ERROR and datasets' at CRITICAL for the length of
    the block, then all put back as they were, also when the block raises (bitcpm reports the scores, and the errors
    datasets raises, itself)."""
    import logging

    from datasets.utils import logging as datasets_logging

    loggers = [logging.getLogger(name) for name in ("lm_eval", "lm-eval", "datasets")]
    levels, enabled = [logger.level for logger in loggers], datasets_logging.is_progress_bar_enabled()
    datasets_logging.disable_progress_bar()
    for logger in loggers:  # datasets logs a data file it cannot parse, then raises: bitcpm reports that (once)
        logger.setLevel(logging.CRITICAL if logger.name == "datasets" else logging.ERROR)
    from lm_eval.api import task as task_module

    bar = task_module.tqdm  # the harness' bar while it builds requests: on stderr, before any error bitcpm reports
    task_module.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        task_module.tqdm = bar
        for logger, level in zip(loggers, levels):  # simple_evaluate's verbosity sets lm_eval's level too
            logger.setLevel(level)
        if enabled and not datasets_logging.is_progress_bar_enabled():
            datasets_logging.enable_progress_bar()


# ---- task templates ---------------------------------------------------------------------------------------------
# The task fields lm-evaluation-harness renders as Jinja2 templates with each document's fields (a value naming one
# of the document's columns is read from the document instead). doc_to_image / doc_to_audio may list templates; a
# doc_to_choice or doc_to_target list is literal.
TEMPLATE_FIELDS = ("doc_to_text", "doc_to_target", "doc_to_choice", "doc_to_image", "doc_to_audio", "gen_prefix",
                   "description", "doc_to_decontamination_query")
_LISTED = {"doc_to_image", "doc_to_audio"}
_LITERAL = {"doc_to_choice", "doc_to_image", "doc_to_audio", "doc_to_decontamination_query"}  # read by literal_eval
_SANDBOX_HINT = ("a task template may use the document's fields, not Python internals: pass --trust-remote-code to "
                 "render it unsandboxed (only for task files you trust)")
_TEMPLATE_HINT = "fix the template named above (lm-evaluation-harness renders it with Jinja2, given each document)"
_CONFIG = ("block_start_string", "block_end_string", "variable_start_string", "variable_end_string",
           "comment_start_string", "comment_end_string", "line_statement_prefix", "line_comment_prefix",
           "trim_blocks", "lstrip_blocks", "newline_sequence", "keep_trailing_newline", "optimized", "undefined",
           "finalize", "autoescape", "loader", "auto_reload", "bytecode_cache")


class TemplateSite(NamedTuple):
    """Where a template string was first found: the task, group or tag name, its kind, its file and the field;
    `literal`: every field it is in has its rendering read as a Python literal (a list of choices, ...)."""

    name: str
    kind: str
    path: Path
    field: str
    literal: bool


def template_sites(checked: dict[str, Any]) -> dict[str, TemplateSite]:
    """Every template string the checked configs hold (their own fields, their fewshot_config's, and a group's
    overrides' and inline members'), each with the first place it occurs."""
    sites: dict[str, TemplateSite] = {}
    for name, entry in checked.items():
        if entry.file is not None:
            for field, source in _template_fields(entry.file.config):
                literal = field.rsplit(".", 1)[-1].rsplit(" ", 1)[-1] in _LITERAL
                site = sites.setdefault(source, TemplateSite(name, entry.kind, entry.file.path, field, literal))
                sites[source] = site._replace(literal=site.literal and literal)
    return sites


def _template_fields(config: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, str]]:
    for field in TEMPLATE_FIELDS:
        value = config.get(field)
        for item in value if field in _LISTED and isinstance(value, list) else [value]:
            if isinstance(item, str):
                yield prefix + field, item
    if isinstance(config.get("fewshot_config"), dict):
        yield from _template_fields(config["fewshot_config"], f"{prefix}fewshot_config.")
    members = config.get("task")
    for item in members if isinstance(members, list) else []:
        if isinstance(item, dict):
            yield from _template_fields(item, f"{prefix}task {item.get('group', item.get('task'))!s}: ")


def template_environment(base: Any, sandboxed: bool, sites: dict[str, TemplateSite]) -> Any:
    """A Jinja2 environment configured as lm-evaluation-harness' own `base` (same syntax, loader, undefined,
    extensions, and its added filters, tests and globals such as `regex_replace`), so a template renders the same;
    `sandboxed`: an ImmutableSandboxedEnvironment, which refuses `_`-prefixed attributes (`__globals__`, ...), unsafe
    callables and changes to the document (its own bounded `range` stays). Any template that fails to compile or
    render raises an InputError naming its task, file and field (`sites`)."""
    env = _environment_class(sandboxed)(extensions=[type(ext) for ext in base.extensions.values()],
                                        enable_async=base.is_async, **{key: getattr(base, key) for key in _CONFIG})
    for own, theirs in ((env.filters, base.filters), (env.tests, base.tests), (env.globals, base.globals)):
        for key, value in theirs.items():
            own.setdefault(key, value)
    env.sites = sites
    return env


@functools.cache
def _environment_class(sandboxed: bool) -> type:
    """jinja2's Environment (or ImmutableSandboxedEnvironment) whose templates report a failure as template_error."""
    from jinja2 import Environment, Template
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    failures = _template_failures()

    class SiteTemplate(Template):
        source: str = ""

        def render(self, *args: Any, **kwargs: Any) -> str:
            try:
                text = super().render(*args, **kwargs)
            except failures as err:  # raised by the template and the document it renders: the user's to fix
                raise template_error(self.environment, self.source, err) from None
            site = self.environment.sites.get(self.source)
            field = _LITERAL_FIELD.get() or (site.field.rsplit(".", 1)[-1] if site is not None and site.literal
                                             else None)
            if field is not None:
                _check_literal(self.environment, self.source, text, field)
            return text

    class SiteEnvironment(ImmutableSandboxedEnvironment if sandboxed else Environment):
        template_class = SiteTemplate
        sites: dict[str, TemplateSite]  # set by template_environment

        def from_string(self, source: Any, globals: Any = None, template_class: Any = None) -> Any:
            try:
                template = super().from_string(source, globals, template_class)
            except failures as err:
                raise template_error(self, source, err) from None
            template.source = source
            return template

    return SiteEnvironment


def _template_failures() -> tuple[type[BaseException], ...]:
    """What a template (and the document it is given) can raise: Jinja2's errors (a syntax error, an undefined
    field, a sandbox refusal) and Python's for a bad operation on a value (`1 / 0`, `x[9]`, a bad regex, too deep)."""
    import re

    from jinja2.exceptions import TemplateError

    return TemplateError, ArithmeticError, LookupError, TypeError, ValueError, RecursionError, re.error


def _check_literal(env: Any, source: str, text: str, field: str) -> None:
    """lm-evaluation-harness reads what a doc_to_choice (doc_to_image, ...) template renders with ast.literal_eval,
    and a doc_to_choice's must be a list of strings: anything else is an InputError here rather than a crash there.
    `field`: the field being rendered."""
    import ast

    shown = " ".join(text.split())[:80]
    try:
        value = ast.literal_eval(text)
    except (SyntaxError, ValueError, TypeError, MemoryError, RecursionError):
        raise template_error(env, source, ValueError(f"rendered {shown!r}, not a Python literal (the harness reads "
                                                     "it with ast.literal_eval: a list such as ['a', 'b'])"),
                             _LITERAL_FIELD.get()) from None
    if field.endswith("doc_to_choice") and not (isinstance(value, list) and value and
                                                all(isinstance(item, str) and item for item in value)):
        raise template_error(env, source, ValueError(f"rendered {shown!r}, not a list of choices (the harness needs "
                                                     "a non-empty list of strings: ['a', 'b'])"), _LITERAL_FIELD.get())


# The literal field (doc_to_choice, doc_to_image, doc_to_audio) lm-evaluation-harness is computing, while it does:
# what a template renders then is read with ast.literal_eval, whatever other fields share the same template string
_LITERAL_FIELD: contextvars.ContextVar[str | None] = contextvars.ContextVar("bitcpm_literal_field", default=None)


@contextmanager
def _literal_fields() -> Iterator[None]:
    """lm-evaluation-harness' ConfigurableTask.doc_to_choice (doc_to_image, doc_to_audio) mark the field they render
    for the length of the block (set _LITERAL_FIELD while they run), then are put back, also when the block raises."""
    from lm_eval.api.task import ConfigurableTask

    saved = {name: ConfigurableTask.__dict__[name] for name in ("doc_to_choice", "doc_to_image", "doc_to_audio")
             if name in ConfigurableTask.__dict__}
    for name, method in saved.items():
        setattr(ConfigurableTask, name, _marking(method, name))
    try:
        yield
    finally:
        for name, method in saved.items():
            setattr(ConfigurableTask, name, method)


def _marking(method: Any, field: str) -> Any:
    @functools.wraps(method)
    def marked(*args: Any, **kwargs: Any) -> Any:
        token = _LITERAL_FIELD.set(field)
        try:
            return method(*args, **kwargs)
        finally:
            _LITERAL_FIELD.reset(token)

    return marked


def template_error(env: Any, source: Any, err: Exception, field: str | None = None) -> InputError:
    """The one-line error for a template that failed: where it came from (`field`: the field being rendered, when
    known, else the first that holds the template), what failed, and how to fix it."""
    from jinja2.exceptions import SecurityError, TemplateSyntaxError

    site = env.sites.get(source) if isinstance(source, str) else None
    where = (f"task file {site.path} ({site.kind} {site.name}): {field or site.field}" if site is not None
             else f"task template {' '.join(str(source).split())[:80]!r}")
    refused = isinstance(err, SecurityError)
    what = "refused by the template sandbox" if refused else \
        "is not a valid template" if isinstance(err, TemplateSyntaxError) else "failed to render"
    line = f" (template line {err.lineno})" if isinstance(err, TemplateSyntaxError) and err.lineno else ""
    message = " ".join(str(err).split())[:200] or type(err).__name__
    return InputError(f"{where} {what}: {message}{line}", hint=_SANDBOX_HINT if refused else _TEMPLATE_HINT)


def compile_templates(checked: dict[str, Any], trusted: bool) -> None:
    """Every template string of the checked configs compiles (nothing is rendered or run), and, unless `trusted`,
    reaches no dunder attribute (`x.__init__`, which the sandbox would refuse when rendering): refused before any
    model loads, naming the file, the task and the field."""
    import lm_eval.utils
    from jinja2 import nodes
    from jinja2.exceptions import SecurityError

    sites = template_sites(checked)
    env = template_environment(lm_eval.utils.env, not trusted, sites)
    for source in sites:
        tree = _parsed(env, source)
        dunders = sorted({node.attr for node in tree.find_all(nodes.Getattr) if node.attr.startswith("__")})
        if dunders and not trusted:
            names = ", ".join(map(repr, dunders))
            raise template_error(env, source, SecurityError(f"access to attribute {names} is unsafe"))


def _parsed(env: Any, source: str) -> Any:
    try:
        return env.parse(source)
    except _template_failures() as err:
        raise template_error(env, source, err) from None


@contextmanager
def task_templates(checked: dict[str, Any], trusted: bool) -> Iterator[None]:
    """lm-evaluation-harness renders every task template (doc_to_text, doc_to_choice, description, the fewshot ones,
    a remote tokenizer's chat template) through its module-level `lm_eval.utils.env`: for the length of the block that
    is template_environment's (sandboxed unless `trusted`), then lm_eval's own again, also when the block raises."""
    import lm_eval.utils

    original = lm_eval.utils.env
    lm_eval.utils.env = template_environment(original, not trusted, template_sites(checked))
    try:
        with _literal_fields():
            yield
    finally:
        lm_eval.utils.env = original


# ---- lm-evaluation-harness --------------------------------------------------------------------------------------
def run_tasks(session, tasks: list[str], harness: Harness) -> dict[str, dict[str, float]] | None:
    """Each task's metrics for a transformers session (a QAT model runs through its fake quantizer), offline;
    None for an engine the harness cannot drive. The datasets cache goes to a temporary folder removed afterwards
    (or to $HF_DATASETS_CACHE when the user set it), never to ~/.cache."""
    loaded = getattr(session, "loaded", None)
    if loaded is None:
        return None
    import tempfile

    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    with tempfile.TemporaryDirectory(prefix="bitcpm-datasets-") as folder, quiet_harness(), \
            task_templates(harness.checked, harness.trusted):
        cache = os.environ.get("HF_DATASETS_CACHE") or folder
        for entry in harness.checked.values():
            if entry.file is not None:
                _set_cache(entry.file.config, cache, entry.kind, set(harness.manager.all_tasks))
        model = HFLM(pretrained=loaded.model, tokenizer=loaded.tokenizer, batch_size=1, device=str(loaded.device))
        with _data_errors(harness):
            results = simple_evaluate(model=model, tasks=harness.configs, task_manager=harness.manager,
                                      log_samples=False, bootstrap_iters=0, verbosity="ERROR",
                                      confirm_run_unsafe_code=harness.trusted)
    scores: dict[str, dict[str, float]] = {}
    for task in tasks:
        metrics = results["results"][task]
        scores[task] = {key.split(",")[0]: float(value) for key, value in metrics.items()  # "acc,none": 0.75
                        if "," in key and "_stderr" not in key and isinstance(value, (int, float))}
    return scores


@contextmanager
def _data_errors(harness: Harness) -> Iterator[None]:
    """datasets failing to read a task's (checked, local) data files, a file that is not the format dataset_path
    names, is an InputError naming the task files and datasets' own reason."""
    from datasets.exceptions import DatasetGenerationError

    try:
        yield
    except DatasetGenerationError as err:
        files = sorted({str(entry.file.path) for entry in harness.checked.values() if entry.file is not None})
        cause = " ".join(str(err.__cause__ or err).split())[:200]
        raise InputError(f"task data of {', '.join(files) or ', '.join(harness.configs)} could not be read: {cause}",
                         hint="point dataset_kwargs.data_files at files in the format dataset_path names (json: "
                              "one JSON object a line)") from None
    except ValueError as err:  # lm_eval's few-shot sampler: random.sample(docs, num_fewshot) on too few documents
        if "Sample larger than population" not in str(err):
            raise
        files = sorted({str(entry.file.path) for entry in harness.checked.values() if entry.file is not None})
        raise InputError(f"num_fewshot in {', '.join(files) or ', '.join(harness.configs)} asks for more few-shot "
                         "examples than the task's data holds",
                         hint="lower num_fewshot, or give the task a fewshot_split with enough documents") from None


def _set_cache(config: dict[str, Any], cache: str, kind: str, known: set[str]) -> None:
    """`cache_dir` in every dataset_kwargs the harness will pass to datasets.load_dataset for this entry: a task's
    own (added when it has none), a group's overrides' and its members' overrides' (only where they have one: an
    override replaces the task's whole dataset_kwargs), an inline task's (added). `known`: the registered names."""
    kwargs = config.get("dataset_kwargs")
    if isinstance(kwargs, dict):
        kwargs["cache_dir"] = cache
    elif kind == "task":
        config["dataset_kwargs"] = {"cache_dir": cache}
    if kind != "group":
        return
    for item in config.get("task") if isinstance(config.get("task"), list) else []:
        if isinstance(item, dict):
            inline = "group" not in item and item.get("task") not in known
            _set_cache(item, cache, "group" if "group" in item else "task" if inline else "override", known)


def _task_config(manager, task: str) -> dict[str, Any] | str:
    """The task's checked config from the manager's --include-path (data paths absolute, relative ones taken from
    the YAML file's folder), or the name for the harness' own tasks."""
    from bitcpm_cli.core.evaluation.task_files import check_tasks

    if not manager.include_path:
        return task
    entry = check_tasks([task], Path(manager.include_path), trusted=False)[task]
    return entry.file.config if entry.file is not None else task


def add_kept(reports: list[dict[str, Any]], tasks: list[str]) -> None:
    """"% of reference kept" for each task's first metric (the harness lists the task's primary metric first)."""
    reference = reports[0].get("tasks") or {}
    for entry in reports:
        scores = entry.get("tasks")
        if not scores:
            continue
        kept = {}
        for task in tasks:
            metric = next(iter(scores[task]), None)
            base = reference.get(task, {}).get(metric) if metric else None
            kept[task] = 100 * scores[task][metric] / base if base else None
        entry["tasks_kept_pct"] = kept
