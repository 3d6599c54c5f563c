"""Multi-process training: which sharding strategy a run uses, pre-flight checks of the backend, and the
collective save of `final/` (every rank takes part; rank 0 writes).

Strategies: plain DDP, DeepSpeed ZeRO-1/2/3 (`deepspeed=FILE.json`) and FSDP (`fsdp=full_shard` with
`fsdp_config`, FSDP2 by default in transformers 5), all through transformers' Trainer and accelerate.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from bitcpm_cli.core.errors import ConfigError, DeviceError
from bitcpm_cli.core.io.readers import file_problem, read_json_file
from bitcpm_cli.core.runtime.extensions import lock_hint, stale_extension_locks


@dataclass
class Strategy:
    """How the model, gradients and optimizer states are spread over the ranks."""

    kind: str  # single, ddp, zero1, zero2, zero3, fsdp
    world: int
    deepspeed: dict[str, Any] | None = None
    fsdp_config: dict[str, Any] | None = None  # FSDP: the fsdp_config given, FSDP_DEFAULTS filled in

    def shards(self, part: str) -> int:
        return shards(self.kind, self.world, part)


def shards(kind: str, world: int, part: str) -> int:
    """Over how many ranks `part` (weights, gradients, optimizer) is split under strategy `kind`."""
    stage = {"zero1": 1, "zero2": 2, "zero3": 3, "fsdp": 3}.get(kind, 0)
    return world if stage >= {"optimizer": 1, "gradients": 2, "weights": 3}[part] else 1


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def _json_object_file(path: str, setting: str, example: str) -> dict[str, Any]:
    """A strategy's JSON config file (`deepspeed=`, `fsdp_config=`): a regular file holding one JSON object."""
    file = Path(path)
    if problem := file_problem(file, f"{setting}: config file"):
        raise ConfigError(problem, hint=f"e.g. {example}")
    data = read_json_file(file, f"{setting} config", error=ConfigError)
    if not isinstance(data, dict):
        raise ConfigError(f"{setting}: {file} must hold a JSON object", hint=f"see {example}")
    return data


def read_deepspeed_config(path: str) -> dict[str, Any]:
    data = _json_object_file(path, "deepspeed", "configs/deepspeed/zero2.json")
    file = Path(path)
    for section in DEEPSPEED_SECTIONS:  # transformers walks these as objects (a list or a number crashes it)
        parent, _, child = section.partition(".")
        node = data.get(parent) if not child else (data.get(parent) or {}).get(child)
        if node is not None and not isinstance(node, dict):
            raise ConfigError(f"deepspeed: {section} must be a JSON object, got {type(node).__name__} ({file})",
                              hint=f'e.g. "optimizer": {{"type": "AdamW", "params": {{"lr": "auto"}}}}, or drop '
                                   f"{section}")
    return data


DEEPSPEED_SECTIONS = ("optimizer", "scheduler", "zero_optimization", "bf16", "fp16", "checkpoint", "optimizer.params",
                      "scheduler.params")


def choose_strategy(deepspeed: str | None, training_args: dict[str, Any], notes: list[str]) -> Strategy:
    """The strategy the settings ask for; a ZeRO-3 config is made to gather the full weights when saving, so
    that final/ holds consolidated weights (a note says so when bitcpm turned that on)."""
    world = world_size()
    fsdp = training_args.get("fsdp")
    if deepspeed and fsdp:
        raise ConfigError("deepspeed and fsdp are both set", hint="choose one sharding strategy")
    if deepspeed:
        config = read_deepspeed_config(deepspeed)
        zero = config.get("zero_optimization") or {}
        stage = zero.get("stage", 0) if isinstance(zero, dict) else None
        if stage not in (0, 1, 2, 3) or isinstance(stage, bool):
            raise ConfigError(f"deepspeed: zero_optimization.stage must be 0, 1, 2 or 3 ({deepspeed})",
                              hint='e.g. "zero_optimization": {"stage": 2}; see configs/deepspeed/zero2.json')
        if stage == 3 and not zero.get("stage3_gather_16bit_weights_on_model_save"):
            config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = True
            notes.append("ZeRO-3: stage3_gather_16bit_weights_on_model_save turned on so that checkpoints and final/ "
                         "hold consolidated weights")
        return Strategy({0: "ddp", 1: "zero1", 2: "zero2", 3: "zero3"}[stage] if world > 1 or stage else "single",
                        world, config)
    if fsdp:
        return Strategy("fsdp", world, fsdp_config=fsdp_settings(training_args.get("fsdp_config"), notes))
    return Strategy("ddp" if world > 1 else "single", world)


# What `fsdp=full_shard` alone runs as (configs/fsdp/fsdp2.json): FSDP2, whose sharded checkpoints save and resume.
# transformers' own default state_dict_type (FULL_STATE_DICT) trains every step, then its first checkpoint save
# dies in save_pretrained ("Attempted to access the data pointer on an invalid python storage").
FSDP_DEFAULTS = {"version": 2, "state_dict_type": "SHARDED_STATE_DICT", "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
                 "reshard_after_forward": True, "cpu_ram_efficient_loading": False}


def fsdp_settings(given: Any, notes: list[str]) -> dict[str, Any]:
    """The fsdp_config a run uses: the one given (a JSON file or a mapping), with every FSDP_DEFAULTS key it leaves
    out filled in (a note names them). Keys may carry transformers' `fsdp_` prefix."""
    if given is None:
        config: dict[str, Any] = {}
    elif isinstance(given, dict):
        config = dict(given)
    elif isinstance(given, str):
        config = _json_object_file(given, "fsdp_config", "configs/fsdp/fsdp2.json")
    else:
        raise ConfigError(f"fsdp_config must be a JSON file or a mapping, got {type(given).__name__}",
                          hint="e.g. fsdp_config=configs/fsdp/fsdp2.json")
    present = {key.removeprefix("fsdp_") for key in config}
    filled = {key: value for key, value in FSDP_DEFAULTS.items() if key not in present}
    if filled:
        notes.append("fsdp: " + ", ".join(f"{key}={value}" for key, value in filled.items()) + " (not set in "
                     "fsdp_config; bitcpm's FSDP defaults, as configs/fsdp/fsdp2.json: sharded checkpoints that "
                     "save and resume, final/ consolidated)")
    return {**config, **filled}


# the "auto" values transformers fills only once the model and the step count are known (trainer_config_finalize)
FILLED_LATER = ("zero_optimization.reduce_bucket_size", "zero_optimization.stage3_prefetch_bucket_size",
                "zero_optimization.stage3_param_persistence_threshold", "scheduler.params.total_num_steps",
                "scheduler.params.warmup_num_steps")


def check_deepspeed_config(args: Any, source: str) -> None:
    """Before the output folder exists: the DeepSpeed config (as transformers filled its "auto" values from the
    recipe) must agree with the recipe, pass DeepSpeed's own config check, and name an optimizer DeepSpeed can build.
    transformers itself reports a contradiction only once training starts, DeepSpeed a bad value only in
    deepspeed.initialize (both exit 3, after the output folder was made)."""
    import copy

    hf_config = getattr(args, "hf_deepspeed_config", None)
    if hf_config is None:
        return
    hint = f'set it to "auto" (the recipe then decides) or to the recipe\'s value, in {source}'
    if hf_config.mismatches:
        first = [_mismatch(line) for line in hf_config.mismatches]
        raise ConfigError(f"deepspeed: {first[0]}", problems=first[1:], hint=hint)
    config = copy.deepcopy(hf_config.config)
    for key in FILLED_LATER:
        node, leaf = hf_config.find_config_node(key)
        if isinstance(node, dict) and node.get(leaf) == "auto":
            _set(config, key, 1)  # a placeholder: transformers puts a number there once the model is loaded
    config.pop("train_batch_size", None)  # checked against the world size above; DeepSpeed's check sees one rank
    _check_optimizer_type(config, source)
    _run_deepspeed_check(config, source)


def _mismatch(line: str) -> str:
    """transformers' `- ds KEY=VALUE vs hf NAME=VALUE` as a sentence naming the DeepSpeed key and the setting."""
    ds_part, _, hf_part = line.lstrip("- ").partition(" vs hf ")
    key, _, value = ds_part.removeprefix("ds ").partition("=")
    name, _, wanted = hf_part.partition("=")
    return f"{key} is {value} but the recipe's {name} makes it {wanted}"


def _set(config: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for part in parents:
        config = config[part]
    config[leaf] = value


def _check_optimizer_type(config: dict[str, Any], source: str) -> None:
    """DeepSpeed builds its own optimizers (Adam, AdamW, Lamb, ...) or any torch.optim class by its name."""
    import torch
    from deepspeed.runtime.config import DEEPSPEED_OPTIMIZERS

    optimizer = config.get("optimizer")
    if optimizer is None:
        return
    kind = optimizer.get("type") if isinstance(optimizer, dict) else None
    if not isinstance(kind, str) or (kind.lower() not in DEEPSPEED_OPTIMIZERS and
                                     not isinstance(getattr(torch.optim, kind, None), type)):
        raise ConfigError(f"deepspeed: optimizer.type {kind!r} is not an optimizer DeepSpeed can build ({source})",
                          hint=f"one of {', '.join(DEEPSPEED_OPTIMIZERS)} or a torch.optim class (e.g. AdamW), or "
                               "drop the optimizer block (bitcpm's recipe then sets the optimizer)")


def _run_deepspeed_check(config: dict[str, Any], source: str) -> None:
    """DeepSpeed's own parsing and sanity checks of the config (DeepSpeedConfig), as deepspeed.initialize runs them."""
    from deepspeed.runtime.config import DeepSpeedConfig

    try:
        DeepSpeedConfig(config)
    except (AssertionError, ValueError, TypeError, KeyError, AttributeError) as exc:  # pydantic's errors are
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]  # ValueErrors
        raise ConfigError(f"deepspeed: DeepSpeed rejects {source}: {'; '.join(lines[:4]) or type(exc).__name__}",
                          hint='fix the key named above; "auto" lets the recipe set train_micro_batch_size_per_gpu, '
                               "gradient_accumulation_steps, train_batch_size and gradient_clipping (see "
                               "configs/deepspeed/zero2.json)") from None


def end_distributed() -> None:
    """Destroy the process group a finished run started, on every rank: a communication thread left running when
    the interpreter exits ends the process with "terminate called without an active exception" (SIGABRT)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def check_backend(device: Any, strategy: Strategy) -> None:
    """Before anything is loaded: a multi-process run needs torch.distributed with a backend for the device, and
    DeepSpeed needs an importable package and no stale extension build lock (it would hang, not fail)."""
    if strategy.world <= 1 and strategy.deepspeed is None:
        return
    import torch.distributed as dist

    from bitcpm_cli.core.runtime.device import distributed_backend

    backend = distributed_backend(device)
    if not dist.is_available():
        raise DeviceError("this torch build has no torch.distributed", hint="install a torch build with distributed")
    available = {"gloo": dist.is_gloo_available, "nccl": dist.is_nccl_available}.get(backend)
    if available is not None and not available():
        raise DeviceError(f"{strategy.world} processes on {device.type} need the {backend} backend, which this torch "
                          "build lacks", hint="install a torch build with it, or run one process")
    if strategy.deepspeed is not None:
        try:
            import deepspeed  # noqa: F401
        except Exception as exc:  # a broken DeepSpeed install raises all sorts of errors on import
            raise DeviceError(f"deepspeed= is set but DeepSpeed cannot be imported ({type(exc).__name__}: {exc})",
                              hint="pip install 'bitcpm[deepspeed]' (on CPU: DS_BUILD_OPS=0, DS_ACCELERATOR=cpu)")
        stale = stale_extension_locks()
        if stale:
            raise DeviceError(f"stale extension build lock {stale[0]}: DeepSpeed would wait on it forever",
                              hint=lock_hint(stale[0]))


RENDEZVOUS_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@contextmanager
def scoped_rendezvous() -> Iterator[None]:
    """What `single_process_rendezvous` sets lasts one run: afterwards (also after a failure) the one-process group
    it led to is destroyed and the variables are put back, so a library caller's process runs again as before."""
    saved = {name: os.environ.get(name) for name in RENDEZVOUS_VARIABLES}
    try:
        yield
    finally:
        if {name: os.environ.get(name) for name in RENDEZVOUS_VARIABLES} != saved:
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                dist.destroy_process_group()
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


def single_process_rendezvous(strategy: Strategy) -> str | None:
    """DeepSpeed started without a launcher asks MPI (mpi4py) for its rank unless RANK, WORLD_SIZE, MASTER_ADDR and
    MASTER_PORT are all set (an sbatch shell sets only SLURM_PROCID, say), and dies without it: on one process, set
    the ones missing as torchrun would, keeping any the user set. Returns the note saying so, or None when they are
    all set (a launcher's run) or WORLD_SIZE says several processes (the launcher's business)."""
    if strategy.deepspeed is None or world_size() > 1:
        return None
    missing = [name for name in RENDEZVOUS_VARIABLES if name not in os.environ]
    if not missing:
        return None
    defaults = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}
    if "MASTER_PORT" in missing:
        import socket

        with socket.socket() as probe:  # a free port now; another process could still take it before DeepSpeed
            probe.bind(("127.0.0.1", 0))
            defaults["MASTER_PORT"] = str(probe.getsockname()[1])
    os.environ.update({name: defaults[name] for name in missing})
    return ("DeepSpeed without a launcher: one process, " + ", ".join(f"{name}={os.environ[name]}" for name in missing)
            + " set as torchrun would")


def save_final_model(trainer: Any, staging: Path, notes: list[str] | None = None) -> None:
    """Consolidated latent weights into `staging`. Collective: every rank must call it (ZeRO-3 and FSDP gather
    the shards); rank 0 writes. The staging path must be the same on every rank.
    A model with bitcpm's LoRA inside the quantizer is merged in place first (training has ended): `staging` gets
    the plain QAT checkpoint whose latent weights are the trained forward's float32 latents (core.training.lora).
    Without DeepSpeed (whose bf16 engine casts the whole model to bf16), final/ is one dtype: float32 where the run
    mixed dtypes (`one_dtype`), as the LoRA merge is."""
    from bitcpm_cli.core.quant import release_fused
    from bitcpm_cli.core.training.lora import check_lora_strategy, is_lora_model, merge_lora

    model = trainer.accelerator.unwrap_model(trainer.model)
    release_fused(model)  # the training forward's cache: as large as the quantized linears, not needed to save
    if is_lora_model(model):
        if trainer.is_fsdp_enabled or (trainer.is_deepspeed_enabled and _zero_stage(trainer) == 3):
            check_lora_strategy("fsdp" if trainer.is_fsdp_enabled else "zero3")
        if trainer.args.should_save:
            merge_lora(model).save_pretrained(staging)
    elif trainer.is_fsdp_enabled:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(trainer.model, options=StateDictOptions(full_state_dict=True))
        if trainer.args.should_save:
            state_dict = {name: tensor.detach().to("cpu", copy=True) for name, tensor in full.items()}
            trainer.accelerator.unwrap_model(trainer.model).save_pretrained(staging, state_dict=state_dict)
    elif trainer.is_deepspeed_enabled:
        state_dict = trainer.accelerator.get_state_dict(trainer.deepspeed)
        if trainer.args.should_save:
            trainer.accelerator.unwrap_model(trainer.model).save_pretrained(staging, state_dict=state_dict)
    else:
        mixed = one_dtype(model)
        if trainer.args.should_save:
            trainer.save_model(str(staging))
            if mixed and notes is not None:
                notes.append(f"final/ is float32: the run held {mixed} (frozen parameters at the checkpoint's "
                             "dtype, trained ones in float32); one dtype that loses nothing, so that every loader "
                             "reads the trained float32 latents unrounded")
    trainer.accelerator.wait_for_everyone()


def one_dtype(model: Any) -> str | None:
    """In place, once training has ended: a model whose floating-point parameters have mixed dtypes (freeze /
    trainable_keys on a 16-bit checkpoint: frozen ones 16-bit, trained ones float32) becomes float32 throughout
    (exact: bf16 / fp16 -> float32 loses nothing), so that its checkpoint is one dtype and config.json's says so
    (transformers writes the first parameter's); a loader using that dtype would round the float32 latents.
    Returns the mixed dtypes as text, or None when there was one dtype (nothing changed)."""
    dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters() if p.is_floating_point()})
    if len(dtypes) < 2:
        return None
    model.float()
    return " and ".join(dtypes)


def _zero_stage(trainer: Any) -> int:
    config = getattr(trainer.accelerator.state.deepspeed_plugin, "deepspeed_config", None) or {}
    return int((config.get("zero_optimization") or {}).get("stage", 0))


def enable_fsdp_on_cpu(trainer: Any) -> None:
    """accelerate only shards with FSDP on accelerators; on CPU processes (gloo) it silently trains plain DDP when
    FSDP is asked for. torch's FSDP2 (`fully_shard`) runs on CPU with gloo, so switch accelerate to it there."""
    from accelerate import FullyShardedDataParallelPlugin
    from accelerate.utils import DistributedType

    state = trainer.accelerator.state
    if trainer.args.fsdp_plugin_args is None or trainer.is_fsdp_enabled:
        return
    if state.distributed_type != DistributedType.MULTI_CPU:
        raise ConfigError(f"fsdp is set but accelerate runs {state.distributed_type.value}, not FSDP",
                          hint="launch with torchrun or accelerate launch on more than one process")
    if trainer.args.fsdp_plugin_args.get("fsdp_version", 2) != 2:
        raise ConfigError("FSDP1 does not run on CPU processes", hint="set fsdp_config version: 2 (FSDP2)")
    plugin = FullyShardedDataParallelPlugin(**trainer.args.fsdp_plugin_args)
    state.distributed_type = DistributedType.FSDP
    state.fsdp_plugin = plugin
    trainer.is_fsdp_enabled = True
