"""Strategy choice and the FSDP-on-CPU switch, without starting processes."""

import json
from types import SimpleNamespace

import pytest

from bitcpm_cli.core.training.distributed import choose_strategy, enable_fsdp_on_cpu
from bitcpm_cli.core.errors import ConfigError


def test_strategies_from_the_settings(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    zero3 = tmp_path / "z3.json"
    zero3.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    notes = []
    strategy = choose_strategy(str(zero3), {}, notes)
    assert (strategy.kind, strategy.world) == ("zero3", 4)
    assert strategy.deepspeed["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert "stage3_gather_16bit_weights_on_model_save turned on" in notes[0]
    assert json.loads(zero3.read_text()) == {"zero_optimization": {"stage": 3}}  # the user's file is unchanged
    assert [strategy.shards(p) for p in ("weights", "gradients", "optimizer")] == [4, 4, 4]
    assert choose_strategy(None, {"fsdp": "full_shard"}, []).kind == "fsdp"
    ddp = choose_strategy(None, {}, [])
    assert ddp.kind == "ddp" and [ddp.shards(p) for p in ("weights", "gradients", "optimizer")] == [1, 1, 1]
    with pytest.raises(ConfigError, match="deepspeed and fsdp are both set"):
        choose_strategy(str(zero3), {"fsdp": "full_shard"}, [])
    with pytest.raises(ConfigError, match="config file not found"):
        choose_strategy(str(tmp_path / "missing.json"), {}, [])


def fake_trainer(distributed_type, version):
    from accelerate.utils import DistributedType

    state = SimpleNamespace(distributed_type=getattr(DistributedType, distributed_type), fsdp_plugin=None)
    return SimpleNamespace(accelerator=SimpleNamespace(state=state), is_fsdp_enabled=False,
                           args=SimpleNamespace(fsdp_plugin_args={"fsdp_version": version,
                                                                  "reshard_after_forward": True}))


def test_fsdp_on_cpu_processes_is_switched_to_fsdp2_and_fsdp1_refused():
    trainer = fake_trainer("MULTI_CPU", 2)
    enable_fsdp_on_cpu(trainer)
    assert trainer.is_fsdp_enabled and trainer.accelerator.state.distributed_type.value == "FSDP"
    assert trainer.accelerator.state.fsdp_plugin.fsdp_version == 2
    with pytest.raises(ConfigError, match="FSDP1 does not run on CPU processes"):
        enable_fsdp_on_cpu(fake_trainer("MULTI_CPU", 1))
    with pytest.raises(ConfigError, match="fsdp is set but accelerate runs"):
        enable_fsdp_on_cpu(fake_trainer("NO", 2))
