"""`bitcpm eval --tasks`: lm-evaluation-harness tasks, run offline on local task YAML files through bitcpm's engines.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from bitcpm_cli.core.errors import InputError


def resolve_tasks(tasks: list[str], include_path: str | Path | None) -> tuple[Any, list[Any]]:
    """(TaskManager, each task's config), offline; unknown task names are refused here, before any model loads."""
    import importlib.util
    import os

    if importlib.util.find_spec("lm_eval") is None:
        raise InputError("--tasks needs lm-evaluation-harness", hint="pip install -e '.[eval]'")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from lm_eval.tasks import TaskManager

    with quiet_harness():
        # with --include-path only its tasks are indexed (the harness' own tasks download their data)
        manager = TaskManager(include_path=str(include_path) if include_path else None,
                              include_defaults=include_path is None)
        unknown = [t for t in tasks if t not in manager.all_tasks]
        if unknown:
            raise InputError(f"unknown task(s): {', '.join(unknown)}", hint="name tasks defined by YAML files in "
                                                                            "--include-path (or lm_eval's own)")
        return manager, [_task_config(manager, task) for task in tasks]


@contextmanager
def quiet_harness() -> Iterator[None]:
    """datasets' progress bars off and lm-evaluation-harness' loggers at ERROR for the length of the block, then both
    put back as they were, also when the block raises (bitcpm reports the scores itself)."""
    import logging

    from datasets.utils import logging as datasets_logging

    loggers = [logging.getLogger(name) for name in ("lm_eval", "lm-eval")]
    levels, enabled = [logger.level for logger in loggers], datasets_logging.is_progress_bar_enabled()
    datasets_logging.disable_progress_bar()
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):  # simple_evaluate's verbosity sets lm_eval's level too
            logger.setLevel(level)
        if enabled and not datasets_logging.is_progress_bar_enabled():
            datasets_logging.enable_progress_bar()


# ---- lm-evaluation-harness --------------------------------------------------------------------------------------
def run_tasks(session, tasks: list[str], harness: tuple[Any, list[Any]]) -> dict[str, dict[str, float]] | None:
    """Each task's metrics for a transformers session (a QAT model runs through its fake quantizer), offline;
    None for an engine the harness cannot drive."""
    loaded = getattr(session, "loaded", None)
    if loaded is None:
        return None
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    manager, configs = harness
    with quiet_harness():
        model = HFLM(pretrained=loaded.model, tokenizer=loaded.tokenizer, batch_size=1, device=str(loaded.device))
        results = simple_evaluate(model=model, tasks=configs, task_manager=manager, log_samples=False,
                                  bootstrap_iters=0, verbosity="ERROR")
    scores: dict[str, dict[str, float]] = {}
    for task in tasks:
        metrics = results["results"][task]
        scores[task] = {key.split(",")[0]: float(value) for key, value in metrics.items()  # "acc,none": 0.75
                        if "," in key and "_stderr" not in key and isinstance(value, (int, float))}
    return scores


def _task_config(manager, task: str) -> dict[str, Any] | str:
    """The task's YAML config with a local `data_files` path made relative to the YAML file's folder (the harness
    would resolve it against the working directory)."""
    entry = manager._index.get(task)
    yaml_path = getattr(entry, "yaml_path", None)
    if yaml_path is None:
        return task
    from lm_eval.tasks._yaml_loader import load_yaml

    config = load_yaml(yaml_path)
    files = (config.get("dataset_kwargs") or {}).get("data_files")
    if config.get("dataset_path") != "json" or not isinstance(files, dict):
        return task
    folder = Path(yaml_path).parent
    config["dataset_kwargs"]["data_files"] = {
        split: str(folder / name) if not Path(name).is_absolute() and "://" not in name else name
        for split, name in files.items()}
    return config


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
