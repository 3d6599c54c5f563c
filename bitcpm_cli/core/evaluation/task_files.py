"""lm-evaluation-harness task YAML files read and checked before the harness sees them.

What holds for every task file under `--include-path` (the harness indexes each `**/*.yaml` there, and whatever
they `include:`): it is a regular file inside the folder (after symlinks and `..`), at most `MAX_BYTES`, UTF-8, one
YAML mapping, read with a safe loader that refuses every tag it does not know and whose aliases expand to at most
`MAX_NODES` nodes (checked on the node graph, before anything is built). For the tasks asked for (and the groups, tags
and includes they use): every key is one the harness' TaskConfig / GroupConfig knows, every data path stays inside
the folder, and anything that would load code (`!function`, `class:`, `unsafe_code`, a metric the harness would fetch
from `evaluate`) needs --trust-remote-code. The checked configs, with data paths made absolute, are what the harness
then builds the tasks from: it does not read the files again.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bitcpm_cli.core.errors import InputError, did_you_mean

MAX_BYTES = 1 << 20  # one task file (lm_eval's own largest are a few KiB)
MAX_NODES = 100_000  # YAML nodes after alias expansion: a billion-laughs document is refused before it is built
_IGNORE_DIRS = {"__pycache__", ".ipynb_checkpoints"}  # as lm_eval's TaskIndex
_HINT = "fix the task file named above (task files are plain YAML that stays inside --include-path)"
_CODE_HINT = "pass --trust-remote-code to let this task file's Python code run (only for task files you trust)"


@dataclass(frozen=True)
class FunctionRef:
    """A `!function module.name` value, recorded instead of imported (`base`: the folder of the file it is in, where
    lm_eval looks for the module)."""

    spec: str
    base: Path


class TaskYamlLoader(yaml.SafeLoader):
    """yaml's SafeLoader plus `!function` (recorded as a FunctionRef, nothing imported); any other tag the safe
    loader does not know (`!!python/object/apply`, ...) stays an error."""

    base = Path(".")


def _construct_function(loader: TaskYamlLoader, node: yaml.Node) -> FunctionRef:
    if not isinstance(node, yaml.ScalarNode):
        raise yaml.constructor.ConstructorError(None, None, "!function needs a `module.name` scalar",
                                                node.start_mark)
    return FunctionRef(str(loader.construct_scalar(node)), loader.base)


TaskYamlLoader.add_constructor("!function", _construct_function)


@dataclass
class TaskFile:
    """One task file as the harness would merge it (includes applied), and the files it was read from."""

    path: Path
    config: dict[str, Any]
    sources: list[Path] = field(default_factory=list)


# ---- reading ----------------------------------------------------------------------------------------------------
def _problem(path: Path, what: str, hint: str = _HINT) -> InputError:
    return InputError(f"task file {path}: {what}", hint=hint)


def inside(path: Path, root: Path) -> bool:
    """Whether `path`, symlinks and `..` resolved, is `root` or below it (`root` already resolved)."""
    resolved = Path(os.path.realpath(path))
    return resolved == root or root in resolved.parents


def _alias_expanded_size(node: yaml.Node, limit: int) -> int:
    """The number of nodes `node` expands to with every alias copied, counted on the composed graph (an alias is a
    shared node there, so this is linear in the document), capped at `limit + 1`; a node inside itself counts as
    unbounded."""
    sizes: dict[int, int] = {}
    ancestors: set[int] = set()  # the nodes whose subtree is being counted: the path from the root
    stack: list[tuple[yaml.Node, bool]] = [(node, False)]
    while stack:
        current, children_done = stack.pop()
        key = id(current)
        if children_done:
            ancestors.discard(key)
            sizes[key] = min(limit + 1, 1 + sum(sizes[id(child)] for child in _children(current)))
        elif key not in sizes:
            ancestors.add(key)
            stack.append((current, True))
            for child in _children(current):
                if id(child) in ancestors:
                    return limit + 1  # a recursive alias
                if id(child) not in sizes:
                    stack.append((child, False))
    return sizes[id(node)]


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return []


def _parse(path: Path, text: str) -> Any:
    """The one YAML document in `text`, read safely (see TaskYamlLoader) and refused when its aliases expand past
    MAX_NODES."""
    try:
        loader = TaskYamlLoader(text)  # its reader refuses control characters here
    except yaml.YAMLError as err:
        raise _problem(path, " ".join(str(err).split()) or "not YAML") from None
    loader.base = Path(os.path.realpath(path)).parent
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _alias_expanded_size(node, MAX_NODES) > MAX_NODES:
            raise _problem(path, f"its aliases expand to more than {MAX_NODES:,} YAML nodes (an alias bomb?)")
        return loader.construct_document(node)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f" (line {mark.line + 1})" if mark is not None else ""
        what = " ".join(str(err.problem or err.context or "not YAML").split())
        raise _problem(path, f"{what}{where}") from None
    except yaml.YAMLError as err:
        raise _problem(path, " ".join(str(err).split()) or "not YAML") from None
    except RecursionError:
        raise _problem(path, "nested too deeply") from None
    finally:
        loader.dispose()


def read_task_yaml(path: Path, root: Path) -> dict[str, Any]:
    """One task file's mapping, refused unless it is a regular file inside `root`, small, UTF-8, safe YAML."""
    if not inside(path, root):
        raise _problem(path, f"resolves outside --include-path ({root})")
    try:
        stat = Path(os.path.realpath(path)).stat()
        if not Path(os.path.realpath(path)).is_file():
            raise _problem(path, "not a regular file")
        if stat.st_size > MAX_BYTES:
            raise _problem(path, f"{stat.st_size:,} bytes, more than a task file's {MAX_BYTES:,}")
        with open(os.path.realpath(path), "rb") as handle:
            raw = handle.read(MAX_BYTES + 1)
    except OSError as err:
        raise _problem(path, f"cannot be read ({err.strerror or err})") from None
    if len(raw) > MAX_BYTES:
        raise _problem(path, f"more than a task file's {MAX_BYTES:,} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise _problem(path, f"not UTF-8 (byte {err.start})") from None
    config = _parse(path, text)
    if not isinstance(config, dict):
        raise _problem(path, f"a YAML {type(config).__name__ if config is not None else 'null'}, not a mapping")
    return config


def load_task_file(path: Path, root: Path, _seen: set[Path] | None = None) -> TaskFile:
    """`path` with its `include:` files merged as lm_eval's load_yaml merges them (included files first, in order,
    without their `task_list`; this file's keys win); every include must stay inside `root`, and a file included
    twice is refused as lm_eval refuses it (its cycle check is shared between sibling includes)."""
    seen = set() if _seen is None else _seen
    resolved = Path(os.path.realpath(path))
    if resolved in seen:
        raise _problem(path, "included twice (an include cycle, which lm-evaluation-harness refuses)")
    seen.add(resolved)
    config = read_task_yaml(path, root)
    if "include" not in config:
        return TaskFile(path, config, [resolved])
    includes = config.pop("include")
    merged: dict[str, Any] = {}
    sources = [resolved]
    for name in includes if isinstance(includes, list) else [includes]:
        if not isinstance(name, str) or not name:
            raise _problem(path, f"include: {name!r} is not a file name")
        target = Path(name) if Path(name).is_absolute() else resolved.parent / name
        if not inside(target, root):
            raise _problem(path, f"include: {name!r} resolves outside --include-path ({root})")
        included = load_task_file(target, root, seen)
        included.config.pop("task_list", None)
        merged.update(included.config)
        sources += included.sources
    merged.update(config)
    return TaskFile(path, merged, sources)


# ---- the index --------------------------------------------------------------------------------------------------
@dataclass
class Entry:
    """A name the harness would register from the folder: a task, a group or a tag (tags list their tasks)."""

    name: str
    kind: str  # "task", "group" or "tag"
    file: TaskFile | None
    tasks: list[str] = field(default_factory=list)


def index_folder(root: Path) -> dict[str, Entry]:
    """Every task, group and tag that lm_eval's TaskIndex would register from `root`, each file read with
    read_task_yaml (a file the harness would skip for being broken is refused here, naming it)."""
    root = Path(os.path.realpath(root))
    index: dict[str, Entry] = {}
    files = sorted((p for p in root.glob("**/*.yaml") if not any(part in _IGNORE_DIRS for part in p.parts)),
                   key=lambda p: p.as_posix())
    for path in files:
        task_file = load_task_file(path, root)
        config = task_file.config
        kind = "task" if "class" in config or ("task" in config and "group" not in config) else \
            "group" if "group" in config else None
        if kind is None:
            continue  # lm_eval skips a file that is neither (a fragment other files include)
        name = config["group" if kind == "group" else "task"]
        if not isinstance(name, str):
            raise _problem(path, f"{'group' if kind == 'group' else 'task'}: {name!r} is not a name")
        if name in index:
            continue  # the harness keeps the first (and logs the duplicate)
        index[name] = Entry(name, kind, task_file)
        if kind == "task":
            _register_tags(index, name, config.get("tag"), path)
    return index


def _register_tags(index: dict[str, Entry], task: str, tags: Any, path: Path) -> None:
    for tag in tags if isinstance(tags, list) else [tags] if tags else []:
        if not isinstance(tag, str):
            raise _problem(path, f"tag: {tag!r} is not a name")
        index.setdefault(tag, Entry(tag, "tag", None)).tasks.append(task)


def walk(value: Any) -> Iterator[Any]:
    """Every value inside a loaded YAML document (bounded: documents are at most MAX_NODES nodes)."""
    stack = [value]
    while stack:
        current = stack.pop()
        yield current
        if isinstance(current, dict):
            stack.extend(current.values())
        elif isinstance(current, list):
            stack.extend(current)


# ---- checking what the requested tasks use ----------------------------------------------------------------------
_STRUCTURAL = {"tag", "group", "task_list", "class"}  # keys lm_eval's TaskFactory takes off before TaskConfig
_TYPES = {"str": (str,), "int": (int,), "bool": (bool,), "float": (float, int), "dict": (dict,), "list": (list,),
          "Callable": (FunctionRef,), "None": (type(None),), "FewshotConfig": (dict,), "OutputType": (str,)}


def _fields(kind: str) -> dict[str, tuple[type, ...] | None]:
    """The harness' TaskConfig (kind "task") or GroupConfig fields, each with the Python types a YAML value may
    have there (None: any)."""
    from dataclasses import fields

    from lm_eval.config.group import GroupConfig
    from lm_eval.config.task import TaskConfig

    result: dict[str, tuple[type, ...] | None] = {}
    for item in fields(TaskConfig if kind == "task" else GroupConfig):
        names = [part.split("[")[0].strip() for part in str(item.type).split("|")]
        types = [t for name in names for t in _TYPES.get(name, ())]
        result[item.name] = None if any(name not in _TYPES for name in names) else tuple(types)
    return result


@dataclass
class Checker:
    """Walks what the requested names use, checking each config in place (data paths made absolute)."""

    index: dict[str, Entry]
    root: Path
    trusted: bool
    used: dict[str, Entry] = field(default_factory=dict)
    active: set[str] = field(default_factory=set)

    def use(self, name: str) -> None:
        entry = self.index[name]
        if name in self.used:
            return
        if name in self.active:
            raise _problem(entry.file.path if entry.file else self.root, f"group {name!r} contains itself")
        self.active.add(name)
        if entry.kind == "tag":
            for task in entry.tasks:
                self.use(task)
        elif entry.kind == "task":
            self.task(entry.file.config, entry.file.path, partial=False)
        else:
            self.group(entry.file.config, entry.file.path)
        self.active.discard(name)
        self.used[name] = entry

    def task(self, config: dict[str, Any], path: Path, partial: bool) -> None:
        """A task's config (or, `partial`, overrides a group applies to its tasks)."""
        allowed = _fields("task")
        for key, value in config.items():
            if key in _STRUCTURAL:
                continue
            self.key(key, value, allowed, path)
        _values(config, path)
        self.code(config, path)
        check_data_paths(config, path, self.root, partial)
        if not partial:
            _whole_task(config, path)

    def key(self, key: Any, value: Any, allowed: dict[str, tuple[type, ...] | None], path: Path) -> None:
        if not isinstance(key, str) or key not in allowed:
            raise _problem(path, f"unknown key {key!r}{did_you_mean(str(key), allowed)}",
                           hint="use the keys lm-evaluation-harness' task configs know (a misspelt key would be "
                                "dropped or crash the harness)")
        types = allowed[key]
        if types is not None and (not isinstance(value, types) or isinstance(value, bool) and bool not in types):
            names = {t.__name__ for t in types}
            wanted = " or ".join(sorted(n.replace("NoneType", "null").replace("FunctionRef", "!function")
                                        for n in names))
            raise _problem(path, f"{key}: a {type(value).__name__} value, the harness takes {wanted}")

    def code(self, config: dict[str, Any], path: Path) -> None:
        """Anything that would load Python code needs --trust-remote-code."""
        if self.trusted:
            return
        for key, value in config.items():
            ref = next((v for v in walk(value) if isinstance(v, FunctionRef)), None)
            if ref is not None:
                raise _problem(path, f"`{key}: !function {ref.spec}` runs Python code", hint=_CODE_HINT)
        if "class" in config:
            raise _problem(path, "`class:` runs a Python task class", hint=_CODE_HINT)
        if config.get("unsafe_code"):
            raise _problem(path, "`unsafe_code: true` runs model-generated code", hint=_CODE_HINT)
        for metric in config.get("metric_list") or []:
            name = metric.get("metric") if isinstance(metric, dict) else metric
            if isinstance(metric, dict) and metric.get("hf_evaluate") or not _registered_metric(name):
                raise _problem(path, f"metric {name!r} is not one of lm-evaluation-harness' own: it would be "
                                     "loaded as code through `evaluate`", hint=_CODE_HINT)

    def group(self, config: dict[str, Any], path: Path) -> None:
        """A group: its own keys, the task overrides it carries, and each member it lists."""
        group_keys = _fields("group")
        overrides = {k: v for k, v in config.items() if k not in group_keys and k not in _STRUCTURAL}
        if not isinstance(config.get("group"), str):
            raise _problem(path, f"group: {config.get('group')!r} is not a name")
        self.task(overrides, path, partial=True)
        members = config.get("task")
        if members is None or isinstance(members, str):
            members = [] if members is None else [members]
        if not isinstance(members, list):
            raise _problem(path, f"group {config['group']!r}: task: must list task names or configs")
        for item in members:
            self.member(item, path)

    def member(self, item: Any, path: Path) -> None:
        if isinstance(item, str):
            if item in self.index:
                self.use(item)
            return  # a name the harness does not know: a task made of the group's overrides (checked above)
        if not isinstance(item, dict) or not ("task" in item or "group" in item):
            raise _problem(path, f"group member {item!r}: need a task name, or a mapping with `task:` or `group:`")
        name = item.get("group", item.get("task"))
        if not isinstance(name, str):
            raise _problem(path, f"group member {name!r} is not a name")
        if name in self.index:
            self.use(name)
            self.task({k: v for k, v in item.items() if k not in ("group", "task")}, path, partial=True)
        elif "group" in item:
            self.group(item, path)  # an inline group
        else:
            self.task(item, path, partial=False)  # an inline task


def _values(config: dict[str, Any], path: Path) -> None:
    """Values the harness' types allow but it cannot build or score a task from: a `class:` that is no `!function`,
    an output_type it does not know, fewer than one repeat, an empty metric_list (the task would score nothing)."""
    from lm_eval.api.task import ALL_OUTPUT_TYPES

    if "class" in config and not isinstance(config["class"], FunctionRef):
        raise _problem(path, f"class: {config['class']!r} is not a `!function module.Class` reference")
    output_type = config.get("output_type")
    if output_type is not None and output_type not in ALL_OUTPUT_TYPES:
        raise _problem(path, f"output_type: {output_type!r} is not one of the harness' "
                             f"{', '.join(ALL_OUTPUT_TYPES)}")
    repeats = config.get("repeats")
    if repeats is not None and (not isinstance(repeats, int) or isinstance(repeats, bool) or repeats < 1):
        raise _problem(path, f"repeats: {repeats!r}, need a whole number of at least 1")
    metrics = config.get("metric_list")
    if metrics == []:
        raise _problem(path, "metric_list: an empty list: the task would score nothing (leave the key out for the "
                             "output type's default metrics)")
    for metric in metrics if isinstance(metrics, list) else []:
        if not isinstance(metric, dict) or not isinstance(metric.get("metric"), (str, FunctionRef)):
            raise _problem(path, f"metric_list: {metric!r}: each entry is a mapping with `metric: NAME`")


def _whole_task(config: dict[str, Any], path: Path) -> None:
    """What the harness needs of a task it builds from the config (a `class:` task builds itself): a name, a test or
    validation split, and the doc_to_text and doc_to_target it applies to a first document while building it (unless
    `use_prompt` gives a promptsource prompt). Only keys set to null are refused: a group may supply missing ones."""
    if not isinstance(config.get("task"), str):
        raise _problem(path, f"task: {config.get('task')!r} is not a name")
    if "class" in config:
        return
    set_null = {key for key, value in config.items() if value is None}  # a missing key a group may still supply
    if set_null & {"test_split", "validation_split"} and config.get("test_split") is None and \
            config.get("validation_split") is None:
        raise _problem(path, "neither test_split nor validation_split is set: the harness has no documents to "
                             "score")
    if config.get("use_prompt") is not None:
        return
    for key in ("doc_to_text", "doc_to_target"):
        if key in set_null:
            raise _problem(path, f"{key}: null: the harness needs a document field, a template or a `!function` "
                                 "there")


def _registered_metric(name: Any) -> bool:
    """Whether `name` is a metric lm-evaluation-harness defines itself (anything else goes to `evaluate.load`)."""
    import lm_eval.api.metrics  # noqa: F401  (fills the registry)
    from lm_eval.api.registry import metric_registry

    return isinstance(name, str) and name in metric_registry


def check_tasks(tasks: list[str], root: Path, trusted: bool) -> dict[str, Entry]:
    """Every name the requested tasks use (tasks, groups, tags), checked; unknown names are refused."""
    index = index_folder(root)
    unknown = [t for t in tasks if t not in index]
    if unknown:
        raise InputError(f"unknown task(s): {', '.join(unknown)}", hint="name tasks defined by YAML files in "
                                                                        "--include-path (or lm_eval's own)")
    checker = Checker(index, Path(os.path.realpath(root)), trusted)
    for name in tasks:
        checker.use(name)
    return checker.used


# ---- data paths -------------------------------------------------------------------------------------------------
_OFFLINE_HINT = ("task data is read offline: point dataset_kwargs.data_files at files inside --include-path (with "
                 "dataset_path: json, csv, ...), or name a Hub dataset id that is in the local Hugging Face cache")
_SPLITS = ("test_split", "validation_split", "training_split", "fewshot_split")


def check_data_paths(config: dict[str, Any], path: Path, root: Path, partial: bool = False) -> None:
    """`dataset_path` is one of datasets' packaged builders (json, csv, ...), a local folder inside `root` (made
    absolute) or a Hub dataset id in the local Hugging Face cache: never a URL. `dataset_kwargs.data_dir` /
    `data_files` (relative ones against the task file's folder, as bitcpm has always read them; the harness would
    use the working directory) must stay inside `root`. `data_files` is rewritten to the absolute files it names (a
    glob: the files datasets matches), `data_dir` to its absolute folder, so the harness loads exactly what was
    checked. For a whole task (not `partial`) read by a packaged builder: it has data files (a data_dir alone is
    turned into the files datasets would pick there), and each split the task names is one they define."""
    kwargs = config.get("dataset_kwargs")
    dataset_path = config.get("dataset_path")
    if isinstance(dataset_path, str):
        config["dataset_path"] = _dataset_path(dataset_path, kwargs, path, root)
    if isinstance(kwargs, dict):
        _dataset_kwargs(kwargs, path, root)
    if not partial and _packaged(dataset_path):
        _check_splits(config, path, root)


def _dataset_kwargs(kwargs: dict[str, Any], path: Path, root: Path) -> None:
    """data_dir and data_files inside `root`, made absolute; no cache_dir."""
    if "cache_dir" in kwargs:
        raise _problem(path, "dataset_kwargs.cache_dir: bitcpm chooses where the datasets cache goes (a temporary "
                             "folder, or $HF_DATASETS_CACHE)")
    base = path.parent
    if "data_dir" in kwargs:
        data_dir = kwargs["data_dir"]
        if not isinstance(data_dir, str) or not data_dir or "://" in data_dir or "::" in data_dir or \
                "\x00" in data_dir:
            raise _problem(path, f"dataset_kwargs.data_dir: {data_dir!r} is not a local folder")
        base = base / os.path.expanduser(data_dir)
        if not inside(base, root):
            raise _problem(path, f"dataset_kwargs.data_dir: {data_dir!r} resolves outside --include-path ({root})")
        base = Path(os.path.realpath(base))
        kwargs["data_dir"] = str(base)
    if "data_files" in kwargs:
        kwargs["data_files"] = _data_files(kwargs["data_files"], base, path, root)


def _packaged(name: Any) -> bool:
    """Whether `name` is one of datasets' packaged builders (json, csv, parquet, text, ...)."""
    from datasets.packaged_modules import _PACKAGED_DATASETS_MODULES

    return isinstance(name, str) and name in _PACKAGED_DATASETS_MODULES


def _dataset_path(name: str, kwargs: Any, path: Path, root: Path) -> str:
    """`name` as the harness should load it, following datasets.load_dataset's own order: a packaged builder as is,
    a local folder (read against the working directory, as datasets reads it) inside `root`, made absolute, or a
    Hub dataset id the local Hugging Face cache holds. A URL, a file, a dataset script, a missing folder and a Hub id
    that would need the network are refused."""
    from datasets.utils.file_utils import is_relative_path

    if _packaged(name):
        return name
    what = f"dataset_path: {name!r}"
    if not name.strip() or "\x00" in name:
        raise _problem(path, f"{what} names no dataset", hint=_OFFLINE_HINT)
    if "://" in name or "::" in name or name.startswith("buckets/") or not is_relative_path(name) and \
            not os.path.isabs(name):
        raise _problem(path, f"{what} is a URL, not local data", hint=_OFFLINE_HINT)
    local = Path(os.path.expanduser(name))
    if os.path.isabs(name) or name.startswith((".", "~")) or local.exists() or name.count("/") > 1 or "\\" in name:
        if not inside(local, root):
            raise _problem(path, f"{what} resolves outside --include-path ({root})", hint=_OFFLINE_HINT)
        if not local.is_dir() or name.endswith(".py"):
            raise _problem(path, f"{what} is not a dataset folder (datasets loads a local dataset_path only from a "
                                 "folder: name a file in dataset_kwargs.data_files instead)", hint=_OFFLINE_HINT)
        return os.path.realpath(local)
    _cached_hub_dataset(name, kwargs, path)
    return name


def _cached_hub_dataset(name: str, kwargs: Any, path: Path) -> None:
    """`name` is a Hub dataset id whose card the local Hugging Face cache holds (what datasets reads first, offline;
    nothing is downloaded)."""
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    what = f"dataset_path: {name!r}"
    try:
        validate_repo_id(name)
    except HFValidationError:
        raise _problem(path, f"{what} is neither a folder (from the working directory, as lm-evaluation-harness "
                             "reads it) nor a Hub dataset id", hint=_OFFLINE_HINT) from None
    revision = kwargs.get("revision") if isinstance(kwargs, dict) else None
    if name.endswith(".py") or not isinstance(try_to_load_from_cache(
            name, "README.md", revision=revision if isinstance(revision, str) else None, repo_type="dataset"), str):
        raise _problem(path, f"{what} is neither a folder (from the working directory, as lm-evaluation-harness "
                             "reads it) nor a Hub dataset in the local Hugging Face cache (bitcpm eval runs "
                             "offline)", hint=_OFFLINE_HINT)


def _check_splits(config: dict[str, Any], path: Path, root: Path) -> None:
    """A packaged builder reads data files: they are named (a data_dir alone becomes the files datasets would pick
    there, each inside `root`), and test_split & co. name splits they define (data_files as a path or a list is
    datasets' `train` split)."""
    from datasets.data_files import sanitize_patterns

    kwargs = config.get("dataset_kwargs")
    kwargs = kwargs if isinstance(kwargs, dict) else {}
    if kwargs.get("data_files") is None:
        if kwargs.get("data_dir") is None:
            raise _problem(path, f"dataset_path: {config['dataset_path']} needs dataset_kwargs.data_files (or "
                                 "data_dir): without them datasets reads the working directory", hint=_OFFLINE_HINT)
        kwargs["data_files"] = _data_dir_files(Path(kwargs["data_dir"]), path, root)
    splits = sorted(str(split) for split in sanitize_patterns(kwargs["data_files"]))
    for key in _SPLITS:
        split = config.get(key)
        if isinstance(split, str) and split not in splits:
            raise _problem(path, f"{key}: {split!r} is not a split of the task's data files (they define "
                                 f"{', '.join(map(repr, splits))})",
                           hint="name the split in dataset_kwargs.data_files ({test: file.jsonl}: a path or a list "
                                "alone is the 'train' split) or set the task's split to one of them")


def _data_dir_files(data_dir: Path, path: Path, root: Path) -> dict[str, list[str]]:
    """The files datasets would read from `data_dir` (its split patterns), each inside `root`."""
    from datasets.data_files import get_data_patterns
    from datasets.exceptions import DatasetsError

    try:
        patterns = get_data_patterns(data_dir.as_posix())
    except (DatasetsError, FileNotFoundError, OSError):
        raise _problem(path, f"dataset_kwargs.data_dir: {str(data_dir)!r} holds no data files") from None
    return {str(split): _data_file_list(list(names), data_dir, path, root, f"dataset_kwargs.data_dir ({split})")
            for split, names in patterns.items()}


def _data_files(files: Any, base: Path, path: Path, root: Path) -> Any:
    key = "dataset_kwargs.data_files"
    if isinstance(files, (str, list)):
        return _data_file_list(files, base, path, root, key)
    if isinstance(files, dict) and files:
        result = {}
        for split, names in files.items():
            if not isinstance(split, str) or not isinstance(names, (str, list)):
                raise _problem(path, f"{key}: {split!r}: need a split name and a path or a list of paths")
            result[split] = _data_file_list(names, base, path, root, f"{key}.{split}")
        return result
    raise _problem(path, f"{key}: need a path, a list of paths or a mapping of split to paths")


def _data_file_list(names: str | list, base: Path, path: Path, root: Path, key: str) -> str | list[str]:
    """Each path or glob, resolved as datasets resolves it (against `base`), every match inside `root`; a literal
    path stays one string."""
    from datasets.data_files import resolve_pattern

    if isinstance(names, list) and not names:
        raise _problem(path, f"{key}: an empty list")
    found: list[str] = []
    for name in names if isinstance(names, list) else [names]:
        if not isinstance(name, str) or not name or "://" in name or "::" in name or "\x00" in name:
            raise _problem(path, f"{key}: {name!r} is not a local path (task data is read offline, from files "
                                 "inside --include-path)")
        pattern = base / os.path.expanduser(name)
        if not inside(pattern, root):
            raise _problem(path, f"{key}: {name!r} resolves outside --include-path ({root})")
        try:
            matches = resolve_pattern(str(pattern), base_path=str(base))
        except (FileNotFoundError, OSError, ValueError):
            raise _problem(path, f"{key}: {name!r} matches no file") from None
        for match in matches:
            if not inside(Path(match), root):
                raise _problem(path, f"{key}: {name!r} resolves outside --include-path ({root})")
            found.append(os.path.realpath(match))
    literal = isinstance(names, str) and not any(c in names for c in "*?[")
    return found[0] if literal and len(found) == 1 else found
