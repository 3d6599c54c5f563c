"""The light training modes on 2 CPU processes (gloo) against one process: trainable_keys with learned scales, and
LoRA inside the quantizer, under DDP and DeepSpeed ZeRO-2: the same losses step by step and the same final/ weights.

Same global batch (1 process: batch 2 x 2 accumulation steps; 2 processes: batch 2 each), same seed, same data
order; tolerances as tests/integration/test_distributed.py (fp32 losses differ only by summation order). ZeRO-3 and
FSDP are refused for these modes before anything loads (their reason is tested in test_train_modes.py's refusals).
"""

import pytest

from bitcpm_cli.core.training.recipe import TrainConfig, resolve_config
from bitcpm_cli.core.training.train import train

from tests.integration.test_distributed import LOSS_RTOL, NO_DEEPSPEED, WEIGHT_ATOL, launch, why
from tests.integration.test_train import RECIPE, ROOT, losses, setup  # noqa: F401 (setup: a fixture)

pytest.importorskip("peft")

STEPS = 3
COMMON = [f"max_steps={STEPS}", "save_steps=100", "logging_steps=1", "group_size=0", "lr=3e-3"]
MODES = {
    "keys": ["trainable_keys=[quant_alpha,norm]", "learned_scales=true"],
    "lora": ["finetuning_type=lora", "lora_rank=4", "lora_target=all"],
}
STRATEGIES = {"ddp": [], "zero2": [f"deepspeed={ROOT / 'configs' / 'deepspeed' / 'zero2.json'}"]}


@pytest.fixture(scope="module", params=list(MODES))
def single(request, setup):
    """The reference: one process, batch 2 x 2 accumulation steps."""
    mode = request.param
    output = setup / f"single-{mode}"
    config = resolve_config(TrainConfig, RECIPE, {"model": str(setup / "float"), "data": [str(setup / "count.txt")],
                                                  "output_dir": str(output)},
                            COMMON + MODES[mode] + ["batch_size=2", "grad_accum=2"])
    train(config)
    return mode, output


@pytest.mark.parametrize("strategy", [pytest.param(name, marks=NO_DEEPSPEED if name == "zero2" else ())
                                      for name in STRATEGIES])
def test_two_processes_train_a_light_mode_as_one_does(single, strategy, setup):
    import torch
    from safetensors.torch import load_file

    mode, reference = single
    output = setup / f"{strategy}-{mode}"
    port = 29620 + 2 * list(MODES).index(mode) + list(STRATEGIES).index(strategy) * 4
    done = launch("-m", "bitcpm_cli", "train", "--config", RECIPE, "--model", setup / "float", "--data",
                  setup / "count.txt", "--output-dir", output, *COMMON, *MODES[mode], "batch_size=2", "grad_accum=1",
                  *STRATEGIES[strategy], port=port)
    assert done.returncode == 0, why(done)
    expected, got = losses(reference), losses(output)
    assert len(expected) == len(got) == STEPS
    assert all(abs(a - b) <= LOSS_RTOL * abs(a) for a, b in zip(expected, got)), (mode, strategy, expected, got)
    want, have = load_file(reference / "final" / "model.safetensors"), load_file(output / "final" / "model.safetensors")
    assert set(want) == set(have)
    for key, tensor in want.items():
        assert have[key].dtype == tensor.dtype, key
        assert torch.allclose(have[key].float(), tensor.float(), atol=WEIGHT_ATOL, rtol=0), (mode, strategy, key)
