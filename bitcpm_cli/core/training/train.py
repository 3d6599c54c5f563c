"""`bitcpm train` (and the engine of `bitcpm sft`): continue pre-training under the ternary fake quantizer, through
transformers' Trainer, resumable, with every setting and input checked before the output folder is created.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

from bitcpm_cli.core.errors import ConfigError, InputError
from bitcpm_cli.core.io.outputs import OutputGuard
from bitcpm_cli.core.io.readers import iter_text_lines, parse_json
from bitcpm_cli.core.model.config_check import require_consistent_config
from bitcpm_cli.core.model.hf import dtype_kwarg, hf_loading, load_tokenizer, quiet_transformers
from bitcpm_cli.core.model.inference_ready import make_inference_ready, read_generation_config
from bitcpm_cli.core.model.tokenizer_bos import prepend_bos_like_training
from bitcpm_cli.core.quant import QuantScheme, load_scheme_file, prepare, qat_layers
from bitcpm_cli.core.runtime.device import distributed_backend, is_main_process, resolve_device
from bitcpm_cli.core.training.callbacks import (
    COMPLETE_MARKER,
    METRICS_FILE,
    PLOT_FILE,
    CompletionMarker,
    EventFn,
    MetricsCallback,
    MetricsLogger,
    checkpoints,
    latest_complete_checkpoint,
    plot_losses,
)
from bitcpm_cli.core.training.data import DataPlan, PackedBlocks, check_data_files, first_block
from bitcpm_cli.core.training.disk import disk_refusal
from bitcpm_cli.core.training.distributed import (
    Strategy,
    check_backend,
    check_deepspeed_config,
    choose_strategy,
    end_distributed,
    save_final_model,
    scoped_rendezvous,
    single_process_rendezvous,
)
from bitcpm_cli.core.training.memory_plan import GIB, MemoryPlan, plan_memory
from bitcpm_cli.core.training.recipe import TrainConfig, save_config
from bitcpm_cli.core.training.trainer import QATTrainer, TrainingDiverged

CONFIG_FILE = "bitcpm_train_config.yaml"


@dataclass
class TrainResult:
    output_dir: str
    final_dir: str
    steps: int
    first_loss: float | None
    last_loss: float | None
    resumed_from: str | None
    scheme: dict[str, Any] | None
    notes: list[str] = field(default_factory=list)
    data_summary: dict[str, Any] = field(default_factory=dict)


def resolve_scheme(config: TrainConfig, recorded: QuantScheme | None, notes: list[str]) -> QuantScheme | None:
    """The scheme to train with: the checkpoint's, a scheme file, or the flags; None trains in full precision."""
    if config.quant_type == "none":
        if recorded is not None:
            notes.append("quant_type none: training a QAT checkpoint WITHOUT its fake quantizer (full precision)")
        return None
    base = load_scheme_file(config.scheme) if config.scheme else recorded or QuantScheme()
    if recorded is not None and config.group_size is not None and config.group_size != recorded.group_size:
        notes.append(f"group_size {config.group_size} replaces the checkpoint's {recorded.group_size}")
    return base.replace(quant_type=config.quant_type, group_size=config.group_size)


def _check_output_dir(config: TrainConfig) -> Path | None:
    output = Path(config.output_dir)
    if output.exists() and not output.is_dir():
        raise InputError(f"--output-dir is a file ({output})", hint="choose a folder")
    resume_from = latest_complete_checkpoint(output) if output.is_dir() else None
    if config.resume:
        if resume_from is None:
            raise InputError(f"--resume: no complete checkpoint in {output}",
                             hint="start a new run without --resume, or point --output-dir at an earlier run")
    elif output.is_dir() and (checkpoints(output) or (output / METRICS_FILE).exists() or (output / "final").exists()):
        raise InputError(f"{output} already holds a training run",
                         hint="pass --resume to continue it, or choose a new --output-dir")
    return resume_from


def pretraining_data(config: TrainConfig, tokenizer: Any) -> DataPlan:
    dataset = PackedBlocks(check_data_files(config.data), tokenizer, config.block_size)
    first_block(dataset)
    return DataPlan(dataset, None, {"files": config.data, "block_size": config.block_size},
                    tokens_per_sample=config.block_size)


def train(config: TrainConfig, *, data: Callable[[TrainConfig, Any], DataPlan] = pretraining_data,
          on_event: EventFn | None = None, callbacks: list[Any] = (),
          extra_files: Callable[[Path, Any], None] | None = None) -> TrainResult:
    """Run (or resume) a training job; the data hook lets `sft` reuse all of this with chat data."""
    # bitcpm reports progress and problems itself; a one-process DeepSpeed group lasts this run only
    with quiet_transformers(verbosity_error=True), scoped_rendezvous():
        return _train(config, data, on_event, callbacks, extra_files)


def _train(config: TrainConfig, data: Callable[[TrainConfig, Any], DataPlan], on_event: EventFn | None,
           callbacks: list[Any], extra_files: Callable[[Path, Any], None] | None) -> TrainResult:
    from transformers import PrinterCallback

    output = Path(config.output_dir)
    resume_from = _check_output_dir(config)
    guard = output_guard(config)
    model_dir, device, strategy, memory, notes = _preflight(config)
    emit = on_event or (lambda event: None)
    emit({"phase": "plan", "plan": memory.to_dict(), "lines": memory.lines()})
    emit({"phase": "loading the tokenizer and the data"})
    tokenizer = load_tokenizer(model_dir, config.trust_remote_code)
    plan = data(config, tokenizer)
    emit({"phase": "loading the model"})
    model, scheme = _load_student(config, model_dir, tokenizer, strategy, notes)
    teacher = _load_teacher(config, model, device) if config.teacher else None

    args = training_arguments(config, output, device, strategy)
    check_deepspeed_config(args, str(config.deepspeed))
    _check_optimizer(args, model)
    if strategy.deepspeed is not None and config.bf16:
        notes.append("bf16 under DeepSpeed: final/ holds DeepSpeed's bf16 copy of the latent weights; the fp32 master "
                     "weights are in the last checkpoint (recover them with its zero_to_fp32.py)")
    emit({"phase": f"preparing {memory.strategy}"})
    if is_main_process():
        # only now is the output folder created (settings and inputs were checked above); claimed before the
        # Trainer exists, since building one creates output_dir, so that a failed run removes what it created
        guard.claim()
    try:
        metrics = MetricsLogger(output / METRICS_FILE, model, plan, config, strategy.world, on_event)
        marker = CompletionMarker(config.save_total_limit)  # marks, then rotates (the Trainer is given no limit)
        trainer = QATTrainer(teacher=teacher, kd_temperature=config.kd_temperature, kd_weight=config.kd_weight,
                             model=model, args=args, train_dataset=plan.dataset, data_collator=plan.collator,
                             callbacks=[MetricsCallback(metrics), marker] + list(callbacks))
        trainer.remove_callback(PrinterCallback)
        if is_main_process():
            save_config(config, output / CONFIG_FILE)
            if plan.summary:
                (output / "data_summary.json").write_text(json.dumps(plan.summary, indent=2) + "\n")
            if resume_from is not None:
                _prepare_resume(output, resume_from, notes)
        _run_and_save(trainer, output, resume_from, tokenizer, extra_files, model_dir, notes)
    except BaseException as exc:
        # a folder this run created goes, unless it holds a complete checkpoint; a save the disk refused (full,
        # read-only: safetensors and torch.save raise no OSError for it) is an InputError naming the folder
        guard.abort(disk_refusal(exc, guard.output) or exc)
        raise
    guard.commit()
    end_distributed()
    final = output / "final"
    return TrainResult(str(output), str(final), trainer.state.global_step, metrics.first_loss, metrics.last_loss,
                       str(resume_from) if resume_from else None, scheme.to_dict() if scheme else None, notes,
                       plan.summary)


def _preflight(config: TrainConfig) -> tuple[Path, Any, Strategy, MemoryPlan, list[str]]:
    """The checks that need no model loaded, in order: the model folder, the device, the strategy and its backend,
    the reporting integrations, the memory plan, config.json and generation_config.json.
    (model folder, device, strategy, memory plan, notes so far)."""
    model_dir = Path(config.model)
    if not model_dir.is_dir():
        raise InputError(f"model folder not found ({model_dir})", hint="pass a Hugging Face model folder")
    device = resolve_device(config.device)
    notes: list[str] = []
    strategy = choose_strategy(config.deepspeed, config.training_args, notes)
    check_backend(device, strategy)
    if rendezvous := single_process_rendezvous(strategy):
        notes.append(rendezvous)
    check_reporting(config.training_args.get("report_to"))
    memory = check_memory(model_dir, config, strategy, device)  # from config.json alone (the careful reader)
    require_consistent_config(model_dir)
    read_generation_config(model_dir)  # a broken generation_config.json fails now, not after training
    return model_dir, device, strategy, memory, notes


def _load_student(config: TrainConfig, model_dir: Path, tokenizer: Any, strategy: Strategy,
                  notes: list[str]) -> tuple[Any, QuantScheme | None]:
    """The model to train, in float32, its embeddings grown to the tokenizer, prepared with the scheme (if any)."""
    with hf_loading(model_dir):
        model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=config.trust_remote_code,
                                                     **{dtype_kwarg(): torch.float32})
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:  # e.g. chat tokens added for SFT
        notes.append(f"embeddings resized from {model.get_input_embeddings().num_embeddings} to {len(tokenizer)} "
                     "tokens to fit the tokenizer")
        model.resize_token_embeddings(len(tokenizer))
    scheme = resolve_scheme(config, QuantScheme.from_config(model.config), notes)
    if scheme is not None:
        prepare(model, scheme)
        if strategy.shards("weights") > 1:
            for layer in qat_layers(model).values():
                layer.cache_fused = False
            notes.append("weights are sharded: metrics.jsonl has no zero_fraction / mean_scale (they are read from "
                         "cached fused weights, which sharded runs do not keep)")
    return model, scheme


def _check_optimizer(args: TrainingArguments, model: Any) -> None:
    """An optimizer whose package is missing fails here, before the output folder exists."""
    try:
        QATTrainer.get_optimizer_cls_and_kwargs(args, model)
    except ImportError as exc:
        optim = getattr(args.optim, "value", args.optim)  # an OptimizerNames member
        raise InputError(f"optim={optim} needs a package that is not installed: {str(exc).splitlines()[0]}",
                         hint="install it, or leave optim at its default (adamw_torch)") from None


REPORTING_PACKAGES = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",), "mlflow": ("mlflow",),
                      "comet_ml": ("comet_ml",), "neptune": ("neptune",), "clearml": ("clearml",),
                      "dvclive": ("dvclive",), "codecarbon": ("codecarbon",)}


def check_reporting(report_to: Any) -> None:
    """`report_to` naming an integration whose package is missing is an InputError now, before anything loads
    (the Trainer would raise a RuntimeError only once the model is loaded and the output folder claimed)."""
    import importlib.util

    names = [report_to] if isinstance(report_to, str) else list(report_to or [])
    for name in names:
        packages = REPORTING_PACKAGES.get(str(name).strip())
        if packages and all(importlib.util.find_spec(p) is None for p in packages):
            raise InputError(f"report_to={name} needs {packages[0]}, which is not installed",
                             hint=f"pip install {packages[0]}, or drop report_to={name}")


def output_guard(config: TrainConfig) -> OutputGuard:
    """The output guard for a training folder: never an input or around one, claimed while the run writes."""
    template = getattr(config, "template", None)
    columns = [c for c in getattr(config, "columns", None) or [] if "=" not in str(c)]  # a dataset_info.json
    fsdp_config = config.training_args.get("fsdp_config")
    inputs = [config.model, *config.data, config.teacher, config.scheme, config.deepspeed,
              template if template and Path(template).is_file() else None, *columns,
              fsdp_config if isinstance(fsdp_config, str) else None]
    return OutputGuard(config.output_dir, inputs, overwrite=True, kind="dir", what="--output-dir", staged=False,
                       keep_on_error=lambda folder: latest_complete_checkpoint(folder) is not None)


def _run_and_save(trainer: Trainer, output: Path, resume_from: Path | None, tokenizer: Any,
                  extra_files: Callable[[Path, Any], None] | None, model_dir: Path, notes: list[str]) -> None:
    try:
        trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    except TrainingDiverged as exc:
        kept = latest_complete_checkpoint(output)
        exc.message += f"; the last good checkpoint is kept: {kept}" if kept else "; no checkpoint was saved before"
        raise
    write_final(trainer, output, tokenizer, extra_files, model_dir, notes)


def training_arguments(config: TrainConfig, output: Path, device: Any, strategy: Strategy) -> TrainingArguments:
    """bitcpm's settings as TrainingArguments; `training_args` (any other field, by its Hugging Face name) last."""
    values = dict(
        output_dir=str(output), max_steps=config.max_steps, per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum, learning_rate=config.lr,
        lr_scheduler_type=config.lr_scheduler, warmup_steps=config.warmup_steps or config.warmup_ratio,
        weight_decay=config.weight_decay,
        adam_beta1=config.adam_beta1, adam_beta2=config.adam_beta2, adam_epsilon=config.adam_epsilon,
        max_grad_norm=config.max_grad_norm, logging_steps=config.logging_steps, logging_first_step=True,
        save_strategy="steps", save_steps=config.save_steps,
        save_total_limit=None,  # bitcpm rotates, once the new checkpoint is marked complete (CompletionMarker)
        seed=config.seed, data_seed=config.seed, bf16=config.bf16, deepspeed=strategy.deepspeed, report_to=[],
        disable_tqdm=True, logging_nan_inf_filter=False, use_cpu=device.type == "cpu",
        ddp_backend=distributed_backend(device) if strategy.world > 1 else None, dataloader_num_workers=0,
        remove_unused_columns=False, **_checkpointing_kwarg(config.gradient_checkpointing),
    )
    values.update(config.training_args)
    if strategy.fsdp_config is not None:
        values["fsdp_config"] = strategy.fsdp_config  # the given one with bitcpm's FSDP defaults filled in
    try:
        return TrainingArguments(**values)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"transformers rejected the training settings: {exc}",
                          hint="fix the setting named above (see `bitcpm train --list-settings`)") from None


def write_final(trainer: Trainer, output: Path, tokenizer: Any, extra_files: Callable[[Path, Any], None] | None,
                model_dir: Path, notes: list[str]) -> Path:
    """final/: consolidated latent weights + tokenizer, staged then renamed. Every rank calls it (collective).
    After pretraining (PackedBlocks: BOS + document + EOS) the tokenizer adds BOS to a plain prompt, as training did;
    sft's final/ keeps its tokenizer's own behaviour (its data is the chat template's rendering, BOS where the
    template puts it)."""
    final = output / "final"
    staging = output / ".final.tmp"  # the same path on every rank
    if is_main_process() and staging.exists():
        shutil.rmtree(staging)
    trainer.accelerator.wait_for_everyone()
    try:
        save_final_model(trainer, staging)
        if is_main_process():
            _complete_final(trainer, staging, tokenizer, extra_files, model_dir, notes)
            if final.exists():
                shutil.rmtree(final)
            os.rename(staging, final)
            plot_losses(output / METRICS_FILE, output / PLOT_FILE)
    except BaseException:
        if is_main_process():  # a full disk, say: the run folder keeps its checkpoints, not a half-written final/
            shutil.rmtree(staging, ignore_errors=True)
        raise
    trainer.accelerator.wait_for_everyone()
    return final


def _complete_final(trainer: Trainer, staging: Path, tokenizer: Any, extra_files: Callable[[Path, Any], None] | None,
                    model_dir: Path, notes: list[str]) -> None:
    tokenizer.save_pretrained(staging)
    if isinstance(trainer.train_dataset, PackedBlocks):  # `train` put BOS before every document: so must final/
        notes += prepend_bos_like_training(staging, tokenizer)
    (staging / "training_args.bin").unlink(missing_ok=True)  # a pickle; the settings are in the YAML beside
    if extra_files is not None:
        extra_files(staging, tokenizer)
    notes += make_inference_ready(staging, model_dir)  # use_cache back on, the input's generation settings


def check_memory(model_dir: Path, config: TrainConfig, strategy: Strategy, device: Any) -> MemoryPlan:
    """The per-rank memory plan; a run that cannot fit stops here, before anything is loaded."""
    memory = plan_memory(model_dir, config, strategy.kind, strategy.world, device)
    if not memory.fits:
        hint = (f"settings that would fit: {'; '.join(memory.suggestions)}" if memory.suggestions else
                "no change of these settings fits: use a device with more memory, or max_memory_gb if the figure "
                "above is wrong")
        raise ConfigError(f"this run needs {memory.total / GIB:.1f} GiB per rank but {memory.available / GIB:.1f} "
                          f"GiB is available ({memory.available_from})", problems=memory.lines(), hint=hint)
    return memory


def _checkpointing_kwarg(enabled: bool) -> dict[str, bool]:
    """transformers 5 renamed gradient_checkpointing to activation_checkpointing."""
    if not enabled:
        return {}
    import dataclasses

    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    return {"activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing": True}


def _load_teacher(config: TrainConfig, student: Any, device) -> Any:
    path = Path(config.teacher)
    if not path.is_dir():
        raise InputError(f"teacher model folder not found ({path})", hint="pass the full-precision model folder")
    with hf_loading(path):
        teacher = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=config.trust_remote_code, **{
            dtype_kwarg(): torch.bfloat16 if config.bf16 else torch.float32})
    if teacher.config.vocab_size != student.config.vocab_size:
        raise ConfigError(f"the teacher's vocab_size {teacher.config.vocab_size} differs from the student's "
                          f"{student.config.vocab_size}", hint="distil from a teacher with the same tokenizer")
    teacher.requires_grad_(False)
    return teacher.to(device).eval()


def _prepare_resume(output: Path, resume_from: Path, notes: list[str]) -> None:
    """Drop what the interrupted run wrote after its last complete checkpoint."""
    step = int(resume_from.name.split("-")[-1])
    for partial in checkpoints(output):
        if not (partial / COMPLETE_MARKER).is_file():
            shutil.rmtree(partial)
            notes.append(f"removed the half-written {partial.name}")
    metrics = output / METRICS_FILE
    if metrics.exists():
        kept = []
        for number, line in iter_text_lines(metrics, "metrics.jsonl"):
            record = parse_json(line, f"{metrics}:{number}", "metrics.jsonl", line=True) if line.strip() else None
            if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
                kept.append(line)
        metrics.write_text("".join(line + "\n" for line in kept))
    notes.append(f"resumed from {resume_from.name} (step {step})")
