"""Outputs meant for inference carry inference settings, not training leftovers.

Training turns the KV cache off (transformers' Trainer writes `use_cache: false` into the model config) and leaves
Trainer files beside the weights; a checkpoint folder converted as is would keep both. Every folder bitcpm writes for
inference (train/sft `final/`, every `convert` folder output) goes through `make_inference_ready` once it is complete.
"""

from __future__ import annotations

import json
from pathlib import Path

from bitcpm_cli.core.errors import ConfigError
from bitcpm_cli.core.io.readers import read_json_file

# Files the Trainer (and bitcpm's checkpoint marker) write that no inference engine reads.
TRAINING_ONLY_FILES = ("training_args.bin", "trainer_state.json", "optimizer.pt", "optimizer.bin", "scheduler.pt",
                       "scaler.pt", "rng_state.pth", "bitcpm_complete")
TRAINING_ONLY_GLOBS = ("rng_state_*.pth", "global_step*")
TRAINING_ONLY_CONFIG_KEYS = ("gradient_checkpointing",)


def _read(path: Path) -> dict:
    """A JSON object file through the careful reader ({} when absent); anything else is exit 2 naming it."""
    if not path.is_file():
        return {}
    data = read_json_file(path, path.name, error=ConfigError)
    if not isinstance(data, dict):
        raise ConfigError(f"{path.name} must hold a JSON object ({path})", hint="fix or remove the file")
    return data


def read_generation_config(model_dir: Path) -> dict:
    """The model folder's generation_config.json (checked before a long run that will copy it at the end)."""
    return _read(Path(model_dir) / "generation_config.json")


def _write(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def make_inference_ready(folder: Path, source: Path | None = None) -> list[str]:
    """Turn the KV cache back on, restore the source model's generation settings, drop training-only files.

    `source` is the model folder the output was made from; generation settings it has and the output lacks are
    copied. Returns notes naming what changed.
    """
    import shutil

    notes: list[str] = []
    config_path = folder / "config.json"
    config = _read(config_path)
    if config:
        changed = [key for key in TRAINING_ONLY_CONFIG_KEYS if config.pop(key, None) is not None]
        if config.get("use_cache") is False:
            config["use_cache"] = True
            changed.append("use_cache false -> true")
        if changed:
            _write(config_path, config)
            notes.append(f"config.json made inference-ready ({', '.join(changed)})")
    generation_path = folder / "generation_config.json"
    generation = _read(generation_path)
    source_generation = _read(source / "generation_config.json") if source is not None and source.is_dir() else {}
    restored = {key: value for key, value in source_generation.items() if key not in generation}
    if generation.get("use_cache") is False:
        restored["use_cache"] = True
    if restored:
        _write(generation_path, {**generation, **restored})
    removed = [path for name in TRAINING_ONLY_FILES if (path := folder / name).exists()]
    removed += [path for pattern in TRAINING_ONLY_GLOBS for path in folder.glob(pattern)]
    for path in removed:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    if removed:
        notes.append(f"left out training-only files: {', '.join(sorted(p.name for p in removed))}")
    return notes
