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

from bitcpm_cli.core.errors import ConfigError, InputError, collect
from bitcpm_cli.core.io.outputs import OutputGuard
from bitcpm_cli.core.io.readers import iter_text_lines, parse_json, read_structured_file
from bitcpm_cli.core.model.checkpoint import read_config, read_tensor_specs
from bitcpm_cli.core.model.config_check import require_consistent_config
from bitcpm_cli.core.model.hf import dtype_kwarg, hf_loading, load_tokenizer, quiet_transformers
from bitcpm_cli.core.model.inference_ready import make_inference_ready, read_generation_config
from bitcpm_cli.core.model.learned_scales import load_learned_scales, quiet_scale_report
from bitcpm_cli.core.model.tokenizer_bos import prepend_bos_like_training
from bitcpm_cli.core.quant import QuantScheme, load_scheme_file, prepare, qat_layers
from bitcpm_cli.core.quant.activations import FUSED_CONFIG_KEY, attach_activations, read_fused_record
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
from bitcpm_cli.core.training.lora import add_lora, check_resume_checkpoint
from bitcpm_cli.core.training.memory_plan import (
    DTYPE_BYTES,
    GIB,
    MemoryPlan,
    Shape,
    checkpoint_dtype,
    human_count,
    plan_memory,
)
from bitcpm_cli.core.training.recipe import TrainConfig, save_config
from bitcpm_cli.core.training.selection import Choice, apply_selection, trainable_names
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
    activations: str | None = None  # the activation scheme(s) trained with (QuantScheme.activation_summary)


def resolve_scheme(config: TrainConfig, recorded: QuantScheme | None, notes: list[str],
                   record: Any = None) -> QuantScheme | None:
    """The scheme to train with: the checkpoint's, a scheme file, or the flags; None trains in full precision.
    learned_scales: unset keeps the checkpoint's; true turns them on; stored scales are never silently dropped.
    `record`: a fused input's `bitcpm_activations` (what its weights were trained with), the activations default."""
    stored = recorded is not None and recorded.learned_scales
    if stored and (config.learned_scales is False or config.quant_type == "none"):
        setting = "learned_scales: false" if config.learned_scales is False else "quant_type none"
        raise ConfigError(f"{setting}: the checkpoint stores learned scales (bitcpm_quant.learned_scales), which "
                          "this run would drop", hint="leave learned_scales unset (or true) to keep training them")
    if config.quant_type == "none":
        if recorded is not None:
            notes.append("quant_type none: training a QAT checkpoint WITHOUT its fake quantizer (full precision)")
        return None
    base = load_scheme_file(config.scheme) if config.scheme else recorded or QuantScheme()
    if stored:
        _refuse_learned_overrides(config, recorded, base)
    if recorded is not None and config.group_size is not None and config.group_size != recorded.group_size:
        notes.append(f"group_size {config.group_size} replaces the checkpoint's {recorded.group_size}")
    learned = True if config.learned_scales or stored else None
    if learned and not stored:
        notes.append("learned_scales: every quantized layer's group scales are parameters (quant_alpha), starting "
                     "from their absmean values")
    notes += [note for note in base.notes if note not in notes]  # e.g. a CANN file's input.bit 8
    scheme = base.replace(quant_type=config.quant_type, group_size=config.group_size, learned_scales=learned)
    if config.activations is not None:
        scheme = scheme.with_activations(config.activations)
    elif record and config.scheme:
        notes.append(f"the scheme file's activations ({scheme.activation_summary()}) replace the fused input's "
                     f"{FUSED_CONFIG_KEY} record ({', '.join(sorted(map(str, record)))}), which says what its weights "
                     "were trained with")
    elif record:
        scheme = _record_activations(scheme, record, notes)
    if recorded is not None and scheme.activation_summary() != recorded.activation_summary():
        notes.append(f"activations {scheme.activation_summary()} replace the checkpoint's "
                     f"{recorded.activation_summary()}: the inputs of the quantized linears are quantized otherwise "
                     "than it was trained with")
    return scheme


def _record_activations(scheme: QuantScheme, record: Any, notes: list[str]) -> QuantScheme:
    """`scheme` with the activations of a fused input's `bitcpm_activations` record (checked against the shapes by
    check_modes): what a run that sets neither `activations` nor a scheme file continues with. Exactly the linears
    the record names quantize their input, each with its scheme (exact-name overrides); every other linear's input
    stays full precision, as it was when the weights were trained."""
    import re

    named = {name: activations for activations, names in record.items() for name in names}
    layers = {re.escape(name): {"activations": activations} for name, activations in sorted(named.items())}
    notes.append(f"activations {', '.join(sorted(set(named.values())))}: the fused input's {FUSED_CONFIG_KEY} record "
                 f"names {len(named)} linears whose inputs its weights were trained to quantize; they keep doing so "
                 "(set activations to train otherwise)")
    return scheme.with_activations("none").replace(layers={**layers, **scheme.with_activations("none").layers})


def _refuse_learned_overrides(config: TrainConfig, recorded: QuantScheme, base: QuantScheme) -> None:
    """A checkpoint's learned scales exist for its own quant types and group sizes only (one scale per group):
    --quant-type, --group-size or a --scheme file that quantize any layer otherwise cannot use them (as `convert`
    refuses them), and absmean in their place would not continue the trained model. From config.json alone."""
    hint = "leave --quant-type, --group-size and --scheme unset: the checkpoint's scheme (bitcpm_quant) is used"
    if problems := recorded.learned_override_problems(config.quant_type, config.group_size):
        raise ConfigError(problems[0], hint=hint)
    if config.scheme:
        keys = ("quant_type", "group_size", "modules_to_not_convert", "layers")
        # the activation scheme is no part of the scales' shapes: a file that changes only activations keeps them
        given, saved = (s.with_activations("none").to_dict() for s in (base, recorded))
        differ = [f"{key} {given.get(key)!r} (the checkpoint's: {saved.get(key)!r})" for key in keys
                  if given.get(key) != saved.get(key)]
        if differ:
            raise ConfigError(f"--scheme {config.scheme} cannot use the checkpoint's learned scales (quant_alpha), "
                              f"which were trained for its own scheme: {'; '.join(differ)}", hint=hint)


def _check_output_dir(config: TrainConfig) -> Path | None:
    output = Path(config.output_dir)
    if output.exists() and not output.is_dir():
        raise InputError(f"--output-dir is a file ({output})", hint="choose a folder")
    resume_from = latest_complete_checkpoint(output) if output.is_dir() else None
    if config.resume:
        if resume_from is None:
            raise InputError(f"--resume: no complete checkpoint in {output}",
                             hint="start a new run without --resume, or point --output-dir at an earlier run")
        check_resume_settings(config, output)  # what trains and how it is quantized: as the run was started
        check_resume_checkpoint(resume_from, config)  # LoRA resumes bitcpm's adapter; any other run, no adapter
    elif output.is_dir() and (checkpoints(output) or (output / METRICS_FILE).exists() or (output / "final").exists()):
        raise InputError(f"{output} already holds a training run",
                         hint="pass --resume to continue it, or choose a new --output-dir")
    return resume_from


# The settings that decide what trains and how it is quantized: a resumed run must keep them (the checkpoint's
# optimizer states, adapter and scales belong to them).
RESUME_SETTINGS = ("finetuning_type", "freeze_trainable_layers", "freeze_trainable_modules", "freeze_extra_modules",
                   "trainable_keys", "lora_rank", "lora_alpha", "lora_dropout", "lora_target", "learned_scales",
                   "quant_type", "group_size", "scheme", "activations")
SCHEME_SETTINGS = ("learned_scales", "quant_type", "group_size", "scheme", "activations")


def check_resume_settings(config: TrainConfig, output: Path) -> None:
    """Before anything loads: --resume with settings (RESUME_SETTINGS) other than those the run was started with
    (its bitcpm_train_config.yaml) is one ConfigError listing every difference, saved vs now. Unset quantization
    settings that resolve to the same scheme as the saved ones (e.g. --group-size 32 on a checkpoint of group size
    32) are no difference. A run folder without the file (written before the first step) has nothing to compare."""
    path = output / CONFIG_FILE
    if not path.is_file():
        return
    saved = read_structured_file(path, CONFIG_FILE)
    if not isinstance(saved, dict):
        raise ConfigError(f"{path} is not a mapping of settings", hint="restore the run's bitcpm_train_config.yaml")
    defaults = type(config)()
    then = {key: _comparable(key, saved.get(key, getattr(defaults, key)), saved) for key in RESUME_SETTINGS}
    now = {key: _comparable(key, getattr(config, key), config.to_dict()) for key in RESUME_SETTINGS}
    differ = [key for key in RESUME_SETTINGS if then[key] != now[key]]
    if any(key in SCHEME_SETTINGS for key in differ) and _same_scheme(config, then):
        differ = [key for key in differ if key not in SCHEME_SETTINGS]
    if differ:
        listed = "; ".join(f"{key} {then[key]!r} (saved) vs {now[key]!r} (now)" for key in differ)
        raise ConfigError(f"--resume: {output} was started with other settings than this run's: {listed}",
                          hint=f"resume with the run's own settings, e.g. --config {path} --resume")


def _comparable(key: str, value: Any, values: dict[str, Any]) -> Any:
    """A setting as compared on resume: lists as lists, lora_alpha unset as its value (2 x lora_rank)."""
    if key == "trainable_keys":
        return list(value or [])
    if key == "lora_alpha":
        rank = values.get("lora_rank", 8)
        return float(value) if value is not None else float(2 * rank) if isinstance(rank, int) else None
    return value


def _same_scheme(config: TrainConfig, then: dict[str, Any]) -> bool:
    """Whether the saved quantization settings and this run's resolve to the same scheme on the model's
    config.json (False when that cannot be decided: the differences are then reported)."""
    import dataclasses

    try:
        values = read_config(Path(config.model))
        recorded = QuantScheme.from_config(values)
        earlier = dataclasses.replace(config, **{key: then[key] for key in SCHEME_SETTINGS})
        schemes = [resolve_scheme(c, recorded, [], values.get(FUSED_CONFIG_KEY)) for c in (earlier, config)]
    except (InputError, ConfigError, TypeError):
        return False
    before, after = (s.to_dict() if s is not None else None for s in schemes)
    return before == after


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
    model_dir, device, strategy, memory, scheme, notes = _preflight(config)
    emit = on_event or (lambda event: None)
    emit({"phase": "plan", "plan": memory.to_dict(), "lines": memory.lines()})
    emit({"phase": "loading the tokenizer and the data"})
    tokenizer = load_tokenizer(model_dir, config.trust_remote_code)
    plan = data(config, tokenizer)
    emit({"phase": "loading the model"})
    model = _load_student(config, model_dir, tokenizer, strategy, scheme, notes)
    teacher = _load_teacher(config, model, device, notes) if config.teacher else None

    args = training_arguments(config, output, device, strategy)
    check_deepspeed_config(args, str(config.deepspeed))
    _check_optimizer(args, model)
    if strategy.deepspeed is not None and config.bf16 and config.finetuning_type != "lora":  # LoRA: merged final/
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
                             kd_loss=config.kd_loss,
                             model=model, args=args, train_dataset=plan.dataset, data_collator=plan.collator,
                             callbacks=[MetricsCallback(metrics), marker] + list(callbacks))
        teacher = None  # the trainer holds it, and lets it go when training ends (before final/ is written)
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
                       plan.summary, scheme.activation_summary() if scheme else None)


def _preflight(config: TrainConfig) -> tuple[Path, Any, Strategy, MemoryPlan, QuantScheme | None, list[str]]:
    """The checks that need no model loaded, in order: the model folder, the device, the strategy and its backend,
    the reporting integrations, the memory plan, config.json and generation_config.json.
    (model folder, device, strategy, memory plan, scheme, notes so far)."""
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
    scheme = check_modes(config, model_dir, strategy, notes)
    memory = check_memory(model_dir, config, strategy, device, scheme)  # from config.json alone (the careful reader)
    require_consistent_config(model_dir)
    read_generation_config(model_dir)  # a broken generation_config.json fails now, not after training
    return model_dir, device, strategy, memory, scheme, notes


def check_modes(config: TrainConfig, model_dir: Path, strategy: Strategy, notes: list[str]) -> QuantScheme | None:
    """Before anything loads, from config.json: the scheme (learned scales included), what trains (every
    trainable_keys pattern / freeze module must name a parameter of the synthetic name table), the strategies and
    dtypes these modes need, the teacher folder. Returns the scheme to train with."""
    values = read_config(model_dir)
    record = values.get(FUSED_CONFIG_KEY)
    if record is not None:  # a fused input's activation record: checked against its headers, then the default
        _, specs = read_tensor_specs(model_dir)
        read_fused_record(record, {n: s.shape for n, s in specs.items()}, str(model_dir / "config.json"))
    scheme = resolve_scheme(config, QuantScheme.from_config(values), notes, record)
    if record is not None and scheme is None:
        notes.append(f"quant_type none: the fused input's {FUSED_CONFIG_KEY} record is dropped (full precision)")
    choice = Choice.from_config(config)
    table = Shape.from_config(model_dir / "config.json").parameter_table(scheme)
    trainable_names(table, choice, str(model_dir))
    if scheme is not None:
        check_activation_blocks(table, scheme, model_dir)
    light = [f"finetuning_type {config.finetuning_type}"] if config.finetuning_type != "full" else []
    light += ["trainable_keys"] if config.trainable_keys else []
    light += ["learned_scales"] if scheme is not None and scheme.learned_scales else []
    if light and strategy.kind in ("zero3", "fsdp"):
        raise ConfigError(f"{', '.join(light)} under {'ZeRO-3' if strategy.kind == 'zero3' else 'FSDP'}: refused; "
                          "sharded weights split the learned scales, the adapters and the mix of frozen 16-bit and "
                          "trainable float32 parameters across ranks, which bitcpm does not test",
                          hint="use DeepSpeed ZeRO-2 (configs/deepspeed/zero2.json) or DDP (torchrun), which work")
    dtype = checkpoint_dtype(values)
    if choice.selective and DTYPE_BYTES[dtype] == 2 and not config.bf16:
        raise ConfigError(f"{choice.describe()}: the frozen parameters stay {dtype} (the checkpoint's dtype), and "
                          "float32 activations cannot meet 16-bit weights", hint="set bf16: true (autocast)")
    if config.teacher:
        check_teacher(Path(config.teacher), values)
    return scheme


def check_activation_blocks(table: dict[str, tuple[int, ...]], scheme: QuantScheme, model_dir: Path) -> None:
    """Before anything loads, from config.json's shapes (`table`, Shape.parameter_table): a blocked activation scheme
    (q8_k: 256 values, q8_0: 32) must divide the input dimension of every linear it quantizes; one ConfigError
    naming every layer that it does not (prepare() would refuse them only once the weights are read)."""
    from bitcpm_cli.core.quant.activations import block_problem
    from bitcpm_cli.core.quant.scheme import is_embedding_name

    problems = []
    for name, shape in table.items():
        module = name.removesuffix(".weight")
        if name.endswith(".weight") and len(shape) == 2 and not is_embedding_name(module):
            spec = scheme.for_module(module)
            problem = block_problem(spec.activations, shape[1], module) if spec.enabled else None
            problems += [problem] if problem else []
    collect(problems, ConfigError, f"the activation scheme does not fit {model_dir}",
            "choose activations whose block divides these layers' inputs (int8-token fits any size, q8_0 needs "
            "multiples of 32), or keep these layers' inputs full precision (activations: none under `layers` in a "
            "--scheme file)")


def check_teacher(path: Path, student: dict[str, Any]) -> None:
    """Before anything loads: the KD teacher is a float model folder (a QAT checkpoint loaded as a float model
    would lose its fake quantizer and learned scales) with the student's vocab_size (config.json's)."""
    from bitcpm_cli.core.quant import SCALE_PARAM
    from bitcpm_cli.core.quant.scheme import CONFIG_KEY

    if not path.is_dir():
        raise InputError(f"teacher model folder not found ({path})", hint="pass the full-precision model folder")
    values = read_config(path)
    hint = ("distil from the float model, or `bitcpm convert` the QAT checkpoint to a fused folder (--format fused) "
            "and pass that")
    if CONFIG_KEY in values:
        raise ConfigError(f"--teacher {path} is a QAT checkpoint (config.json has {CONFIG_KEY}); the teacher must be "
                          "a float model (its fake quantizer would be dropped)", hint=hint)
    if values.get("vocab_size") != student.get("vocab_size"):
        raise ConfigError(f"the teacher's vocab_size {values.get('vocab_size')} ({path / 'config.json'}) differs "
                          f"from the student's {student.get('vocab_size')}",
                          hint="distil from a teacher with the same tokenizer")
    _, specs = read_tensor_specs(path)
    if FUSED_CONFIG_KEY in values:  # a fused teacher's activation record: checked now, run by _load_teacher
        read_fused_record(values[FUSED_CONFIG_KEY], {n: s.shape for n, s in specs.items()}, str(path / "config.json"))
    scales = sorted(name for name in specs if name.endswith("." + SCALE_PARAM))
    if scales:
        raise ConfigError(f"--teacher {path} stores learned scales ({scales[0]}, {len(scales)} in all): a QAT "
                          "checkpoint; the teacher must be a float model", hint=hint)


def _load_student(config: TrainConfig, model_dir: Path, tokenizer: Any, strategy: Strategy,
                  scheme: QuantScheme | None, notes: list[str]) -> Any:
    """The model to train, its embeddings grown to the tokenizer, prepared with the scheme (if any), its learned
    scales loaded, what does not train frozen: in float32 when everything trains; otherwise loaded in the
    checkpoint's dtype, the trainable parameters upcast to float32 (as LLaMA-Factory does), the frozen ones kept."""
    choice = Choice.from_config(config)
    dtype = getattr(torch, checkpoint_dtype(read_config(model_dir))) if choice.selective else torch.float32
    with hf_loading(model_dir), quiet_scale_report():  # the learned scales it calls unexpected are loaded below
        model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=config.trust_remote_code,
                                                     **{dtype_kwarg(): dtype})
    grown = max(0, len(tokenizer) - model.get_input_embeddings().num_embeddings)
    if grown:  # e.g. chat tokens added for SFT
        notes.append(f"embeddings resized from {model.get_input_embeddings().num_embeddings} to {len(tokenizer)} "
                     "tokens to fit the tokenizer")
        torch.manual_seed(config.seed)  # the new rows are drawn at random: the same ones again on --resume
        model.resize_token_embeddings(len(tokenizer))
    if scheme is None and hasattr(model.config, FUSED_CONFIG_KEY):  # full precision: no input is quantized now
        delattr(model.config, FUSED_CONFIG_KEY)
    if scheme is not None:
        recorded = QuantScheme.from_config(model.config)
        prepare(model, scheme)
        load_learned_scales(model, model_dir, allow_missing=scheme.learned_scales and not (
            recorded is not None and recorded.learned_scales))
        if strategy.shards("weights") > 1:
            for layer in qat_layers(model).values():
                layer.cache_fused = False
            notes.append("weights are sharded: metrics.jsonl has no zero_fraction / mean_scale (they are read from "
                         "cached fused weights, which sharded runs do not keep)")
    if choice.selective:
        trainable, frozen = apply_selection(model, choice, f"{model_dir} (loaded)")
        if choice.finetuning_type == "lora":
            model = add_lora(model, config, notes)
        else:
            notes.append(f"{choice.describe()}: {human_count(trainable)} parameters train, {human_count(frozen)} are "
                         f"frozen (kept in {str(dtype).removeprefix('torch.')})")
        if grown:
            notes += frozen_new_rows(model, grown, choice)
        if config.gradient_checkpointing:
            model.enable_input_require_grads()  # frozen embeddings: recomputed layers still get an input with grad
    return model


def frozen_new_rows(model: Any, grown: int, choice: Choice) -> list[str]:
    """A loud note when the rows the resize added (`grown` tokens: sft's chat tokens) stay frozen at their initial
    values: the input embedding's, and the output embedding's unless LoRA adapts it (an adapter covers every row).
    Training only those rows would need a gradient mask and per-row optimizer states; bitcpm says so instead."""
    embeddings = {"embedding": model.get_input_embeddings(), "lm_head": model.get_output_embeddings()}
    frozen = []
    for name, module in embeddings.items():
        weight = getattr(module, "weight", None) if not hasattr(module, "lora_A") else None
        if weight is not None and not weight.requires_grad and not (
                name == "lm_head" and weight is getattr(embeddings["embedding"], "weight", None)):
            frozen.append(name)
    if not frozen:
        return []
    rows = " and ".join(f"{grown} new {name} rows" for name in frozen)
    return [f"NOTE: {rows} (for the tokenizer's tokens beyond the checkpoint's vocabulary, e.g. the chat tokens "
            f"sft added) stay FROZEN at their initial values under "
            f"{choice.describe()}: the model cannot learn these tokens; to train them, use finetuning_type full, or "
            "add embed_tokens and lm_head to trainable_keys / freeze_extra_modules"]


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
        save_final_model(trainer, staging, notes)
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


def check_memory(model_dir: Path, config: TrainConfig, strategy: Strategy, device: Any,
                 scheme: QuantScheme | None = None) -> MemoryPlan:
    """The per-rank memory plan; a run that cannot fit stops here, before anything is loaded."""
    memory = plan_memory(model_dir, config, strategy.kind, strategy.world, device, scheme)
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


def _load_teacher(config: TrainConfig, student: Any, device, notes: list[str]) -> Any:
    """The teacher (checked by check_teacher before anything loaded), in inference mode, in the planned dtype; a fused
    teacher quantizes its linears' inputs as its `bitcpm_activations` record says (what it computed when it was the
    QAT model)."""
    path = Path(config.teacher)
    values = read_config(path)
    vocab = values.get("vocab_size")
    if vocab != student.config.vocab_size:  # the student grew to its tokenizer (sft's chat tokens)
        raise ConfigError(f"the teacher's vocab_size {vocab} differs from the student's {student.config.vocab_size} "
                          "(grown to fit the tokenizer)", hint="distil from a teacher with the same tokenizer")
    with hf_loading(path):
        teacher = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=config.trust_remote_code, **{
            dtype_kwarg(): torch.bfloat16 if config.bf16 else torch.float32})
    teacher.requires_grad_(False)
    if FUSED_CONFIG_KEY in values:  # check_teacher checked the record against the headers
        record = {name: scheme for scheme, names in values[FUSED_CONFIG_KEY].items() for name in names}
        count = attach_activations(teacher, record)
        notes.append(f"the teacher quantizes the input of {count} linears as its {FUSED_CONFIG_KEY} record says "
                     f"({', '.join(sorted(set(record.values())))})")
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
