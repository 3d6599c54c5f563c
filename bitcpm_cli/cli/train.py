"""`bitcpm train`: continued pre-training of a ternary QAT checkpoint under the fake quantizer."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

from bitcpm_cli.cli import training as opt
from bitcpm_cli.core.runtime.device import is_main_process


def train(
    overrides: Optional[List[str]] = opt.OVERRIDES,
    config: Optional[Path] = opt.CONFIG,
    model: Optional[Path] = opt.MODEL,
    data: Optional[List[Path]] = opt.DATA,
    output_dir: Optional[Path] = opt.OUTPUT_DIR,
    max_steps: Optional[int] = opt.MAX_STEPS,
    quant_type: Optional[str] = opt.QUANT_TYPE,
    group_size: Optional[int] = opt.GROUP_SIZE,
    scheme: Optional[Path] = opt.SCHEME,
    activations: Optional[str] = opt.ACTIVATIONS,
    lr: Optional[float] = opt.LR,
    batch_size: Optional[int] = opt.BATCH_SIZE,
    grad_accum: Optional[int] = opt.GRAD_ACCUM,
    block_size: Optional[int] = opt.typer.Option(None, "--block-size", help="Tokens per packed training sequence."),
    save_steps: Optional[int] = opt.SAVE_STEPS,
    logging_steps: Optional[int] = opt.LOGGING_STEPS,
    seed: Optional[int] = opt.SEED,
    device: Optional[str] = opt.DEVICE,
    bf16: Optional[bool] = opt.BF16,
    deepspeed: Optional[Path] = opt.DEEPSPEED,
    resume: Optional[bool] = opt.RESUME,
    teacher: Optional[Path] = opt.TEACHER,
    trust_remote_code: Optional[bool] = opt.TRUST_REMOTE_CODE,
    list_settings: bool = opt.LIST_SETTINGS,
    json_output: bool = opt.JSON,
) -> None:
    """Continue pre-training under the ternary fake quantizer (STE), on transformers' Trainer.

    Data: .jsonl with a `text` field, .txt (a document a line) or .parquet; tokenised, joined with EOS and packed
    into --block-size sequences. Outputs metrics.jsonl, resumable checkpoints, loss.png and final/ (a QAT
    checkpoint). Settings also take every transformers TrainingArguments field by its name (learning_rate,
    report_to, fsdp, ...; see --list-settings). Works under torchrun, DeepSpeed ZeRO-1/2/3 and FSDP2.
    """
    from bitcpm_cli.core.training.recipe import TrainConfig, resolve_config
    from bitcpm_cli.core.training.train import train as run_training

    if list_settings:
        opt.render_settings(TrainConfig, json_output)
        return

    settings = resolve_config(TrainConfig, config, opt.flags(
        model=model, data=data, output_dir=output_dir, max_steps=max_steps, quant_type=quant_type,
        group_size=group_size, scheme=scheme, activations=activations, lr=lr, batch_size=batch_size,
        grad_accum=grad_accum,
        block_size=block_size, save_steps=save_steps, logging_steps=logging_steps, seed=seed, device=device,
        bf16=bf16, deepspeed=deepspeed, resume=resume, teacher=teacher, trust_remote_code=trust_remote_code,
    ), overrides)
    result = opt.run_with_progress(lambda on_event: run_training(settings, on_event=on_event), is_main_process(),
                                   settings.max_steps)
    if is_main_process():
        opt.print_result_json(result) if json_output else opt.render_result(result, "training finished")
