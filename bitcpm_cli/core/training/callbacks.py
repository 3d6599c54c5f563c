"""What a training run leaves as it goes: metrics.jsonl and the live events (`MetricsLogger`, `MetricsCallback`), the
marker of a complete checkpoint (`CompletionMarker`), and the loss-curve PNG.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path
from typing import Any, Callable

from transformers import TrainerCallback

from bitcpm_cli.core.quant import qat_layers
from bitcpm_cli.core.training.data import DataPlan
from bitcpm_cli.core.training.recipe import TrainConfig

COMPLETE_MARKER = "bitcpm_complete"
METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"
EventFn = Callable[[dict[str, Any]], None]


def checkpoints(output_dir: Path) -> list[Path]:
    """The checkpoint-N folders of a run, oldest first."""
    found = [p for p in output_dir.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def latest_complete_checkpoint(output_dir: Path) -> Path | None:
    """The newest checkpoint that was written to the end (our marker is written after the Trainer's save)."""
    complete = [p for p in checkpoints(output_dir) if (p / COMPLETE_MARKER).is_file()]
    return complete[-1] if complete else None


class CompletionMarker(TrainerCallback):
    """Written after the Trainer's save returns: a checkpoint without it is half-written.

    It also rotates checkpoints (the Trainer is given save_total_limit=None): only once the new checkpoint is marked
    complete are the older complete ones beyond `limit` removed, so a run killed at any point keeps a checkpoint
    `--resume` uses (the Trainer's own rotation deletes the old one before the new one is marked)."""

    def __init__(self, limit: int | None = None):
        self.limit = limit

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if folder.is_dir():
                (folder / COMPLETE_MARKER).write_text(json.dumps({"step": state.global_step}) + "\n")
                rotate_checkpoints(Path(args.output_dir), self.limit, state.global_step)


def rotate_checkpoints(output_dir: Path, limit: int | None, newest: int) -> list[Path]:
    """Remove complete checkpoints older than step `newest` beyond the newest `limit` complete ones (the marker
    first, so a folder half-removed is never taken for complete); half-written ones are left to --resume's cleanup.
    Returns what was removed."""
    if limit is None:
        return []
    complete = [p for p in checkpoints(output_dir) if (p / COMPLETE_MARKER).is_file()
                and int(p.name.split("-")[-1]) <= newest]
    removed = complete[:-limit] if len(complete) > limit else []
    for folder in removed:
        (folder / COMPLETE_MARKER).unlink()
        shutil.rmtree(folder)
    return removed


class MetricsLogger:
    """metrics.jsonl (one object per logged step) and live events for the CLI."""

    def __init__(self, path: Path, model: Any, plan: DataPlan, config: TrainConfig, world: int,
                 on_event: EventFn | None):
        self.path, self.model, self.on_event, self.config = path, model, on_event, config
        self.tokens_per_step = (plan.tokens_per_sample or config.block_size) * config.batch_size * config.grad_accum * world
        self.first_loss: float | None = None
        self.last_loss: float | None = None
        self._last_step, self._last_time = 0, time.perf_counter()

    def health(self) -> dict[str, float]:
        """Fraction of zero codes and mean |scale| over the quantized linears (from the cached fused weights)."""
        zeros = total = 0
        scale_sum, nonzero = 0.0, 0
        for layer in qat_layers(self.model).values():
            fused = getattr(layer, "_fused", None)
            if fused is None:
                continue
            is_zero = fused == 0
            zeros += int(is_zero.sum())
            total += fused.numel()
            scale_sum += float(fused.abs().sum())
            nonzero += fused.numel() - int(is_zero.sum())
        if not total:
            return {}
        return {"zero_fraction": round(zeros / total, 6), "mean_scale": scale_sum / max(nonzero, 1)}

    def log(self, state: Any, logs: dict[str, Any]) -> None:
        now = time.perf_counter()
        steps = state.global_step - self._last_step
        record = {"step": state.global_step, "loss": logs["loss"], "lr": logs.get("learning_rate"),
                  "grad_norm": logs.get("grad_norm"),
                  "tokens_per_s": round(steps * self.tokens_per_step / (now - self._last_time), 2) if steps else None,
                  **({"kd_loss": logs["kd_loss"]} if "kd_loss" in logs else {}), **self.health()}
        self._last_step, self._last_time = state.global_step, now
        if self.first_loss is None:
            self.first_loss = record["loss"]
        self.last_loss = record["loss"]
        if state.is_world_process_zero:
            with self.path.open("a") as handle:
                handle.write(json.dumps(record) + "\n")
            if self.on_event is not None:
                self.on_event({**record, "max_steps": state.max_steps})


class MetricsCallback(TrainerCallback):
    def __init__(self, logger: MetricsLogger):
        self.logger = logger

    def on_train_begin(self, args, state, control, **kwargs):
        self.logger._last_step, self.logger._last_time = state.global_step, time.perf_counter()
        if state.is_world_process_zero and self.logger.on_event is not None:
            self.logger.on_event({"phase": f"step {state.global_step + 1} (the first one also builds the graph)"})

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.logger.log(state, logs)


def read_losses(metrics: Path) -> list[tuple[int, float]]:
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line] if metrics.exists() else []
    return [(r["step"], r["loss"]) for r in records if r.get("loss") is not None and math.isfinite(r["loss"])]


def plot_losses(metrics: Path, png: Path, series: dict[str, Path] | None = None) -> None:
    """A loss-curve PNG of one metrics.jsonl, or of several (`series`: label -> metrics.jsonl) side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = series or {"training loss": metrics}
    figure, axes = plt.subplots(1, len(series), figsize=(6 * len(series), 3.5), dpi=100, squeeze=False)
    for axis, (label, path) in zip(axes[0], series.items()):
        points = read_losses(path)
        axis.plot([p[0] for p in points], [p[1] for p in points], marker=".")
        axis.set_xlabel("step")
        axis.set_ylabel("loss")
        axis.set_title(label)
        axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(png)
    plt.close(figure)
