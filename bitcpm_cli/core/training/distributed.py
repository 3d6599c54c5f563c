"""Multi-process training: which sharding strategy a run uses, pre-flight checks of the backend, and the
collective save of `final/` (every rank takes part; rank 0 writes).

Strategies: plain DDP, DeepSpeed ZeRO-1/2/3 (`deepspeed=FILE.json`) and FSDP (`fsdp=full_shard` with
`fsdp_config`, FSDP2 by default in transformers 5), all through transformers' Trainer and accelerate.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bitcpm_cli.core.errors import ConfigError, DeviceError
from bitcpm_cli.core.io.readers import read_json_file
from bitcpm_cli.core.runtime.extensions import lock_hint, stale_extension_locks


@dataclass
class Strategy:
    """How the model, gradients and optimizer states are spread over the ranks."""

    kind: str  # single, ddp, zero1, zero2, zero3, fsdp
    world: int
    deepspeed: dict[str, Any] | None = None

    def shards(self, part: str) -> int:
        return shards(self.kind, self.world, part)


def shards(kind: str, world: int, part: str) -> int:
    """Over how many ranks `part` (weights, gradients, optimizer) is split under strategy `kind`."""
    stage = {"zero1": 1, "zero2": 2, "zero3": 3, "fsdp": 3}.get(kind, 0)
    return world if stage >= {"optimizer": 1, "gradients": 2, "weights": 3}[part] else 1


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def read_deepspeed_config(path: str) -> dict[str, Any]:
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"deepspeed: config file not found ({file})", hint="e.g. configs/deepspeed/zero2.json")
    data = read_json_file(file, "deepspeed config", error=ConfigError)
    if not isinstance(data, dict):
        raise ConfigError(f"deepspeed: {file} must hold a JSON object", hint="see configs/deepspeed/zero2.json")
    return data


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
        return Strategy("fsdp", world)
    return Strategy("ddp" if world > 1 else "single", world)


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


def save_final_model(trainer: Any, staging: Path) -> None:
    """Consolidated latent weights into `staging`. Collective: every rank must call it (ZeRO-3 and FSDP gather
    the shards); rank 0 writes. The staging path must be the same on every rank."""
    if trainer.is_fsdp_enabled:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(trainer.model, options=StateDictOptions(full_state_dict=True))
        if trainer.args.should_save:
            state_dict = {name: tensor.detach().to("cpu", copy=True) for name, tensor in full.items()}
            trainer.accelerator.unwrap_model(trainer.model).save_pretrained(staging, state_dict=state_dict)
    elif trainer.is_deepspeed_enabled:
        state_dict = trainer.accelerator.get_state_dict(trainer.deepspeed)
        if trainer.args.should_save:
            trainer.accelerator.unwrap_model(trainer.model).save_pretrained(staging, state_dict=state_dict)
    elif trainer.args.should_save:
        trainer.save_model(str(staging))
    trainer.accelerator.wait_for_everyone()


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
