"""ZeRO-2, ZeRO-3 and FSDP2 on 2 CPU processes (gloo) against one process: the same losses step by step, the same
final/ weights, and resume after a kill continuing the same curve.

Same global batch (1 process: batch 2 x 2 accumulation steps; 2 processes: batch 2 each), same seed, same data order.
The fake quantizer uses one scale per tensor (group_size 0): a scale computed from a shard instead of the whole
gathered weight would change the losses at once.

Tolerance: fp32 losses differ only by summation order (a gradient all-reduce instead of accumulation); measured
here: 1.3e-7 relative at most (one float32 ulp), final weights 1.1e-6 absolute at most (ZeRO-3). Ternary rounding
can amplify such a difference when a weight sits on a rounding threshold, so losses are compared to 1e-4 relative
and final weights to 1e-4 absolute, far below what they guard against: a fused weight one optimizer step stale
would show the previous step's weights, and the loss moves by 0.2 to 0.4 a step here.
"""

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest

from bitcpm_cli.core.training.recipe import TrainConfig, resolve_config
from bitcpm_cli.core.training.train import latest_complete_checkpoint, train

from tests.integration.test_train import RECIPE, ROOT, losses, setup  # noqa: F401 (setup: a fixture)

NO_DEEPSPEED = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="needs bitcpm[deepspeed]")
STEPS, KILL_AT, SAVE_EVERY = 4, 3, 2
COMMON = [f"max_steps={STEPS}", f"save_steps={SAVE_EVERY}", "logging_steps=1", "group_size=0", "lr=3e-3"]
STRATEGIES = {
    "zero2": [f"deepspeed={ROOT / 'configs' / 'deepspeed' / 'zero2.json'}"],
    "zero3": [f"deepspeed={ROOT / 'configs' / 'deepspeed' / 'zero3.json'}"],
    "fsdp": ["fsdp=full_shard", f"fsdp_config={ROOT / 'configs' / 'fsdp' / 'fsdp2.json'}"],
    # as Hugging Face users write it, no fsdp_config: transformers' default FULL_STATE_DICT used to train every step
    # and then die at the first checkpoint save ("invalid python storage"); bitcpm fills in configs/fsdp/fsdp2.json's
    "fsdp-hf": ["fsdp=full_shard"],
}
LOSS_RTOL, WEIGHT_ATOL = 1e-4, 1e-4

KILLED_RUN = textwrap.dedent("""
    import json, os, signal, sys
    from transformers import TrainerCallback
    from bitcpm_cli.core.quant.qat import optimizer_steps
    from bitcpm_cli.core.training.recipe import TrainConfig, resolve_config
    from bitcpm_cli.core.training.train import train

    class Kill(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            # the fused-weight cache is invalidated by a torch optimizer-step hook: it must fire under every wrapper
            with open(os.path.join(sys.argv[4], f"steps-{os.environ['RANK']}-{state.global_step}"), "w") as f:
                f.write(str(optimizer_steps()))
            if state.global_step == int(sys.argv[3]):
                os.kill(os.getpid(), signal.SIGKILL)

    recipe, output = sys.argv[1:3]
    config = resolve_config(TrainConfig, recipe, {"output_dir": output}, sys.argv[5:])
    train(config, callbacks=[Kill()])
""")


def launch(*args, port):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(port), *map(str, args)], cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)


def why(done) -> str:
    """The lines of a failed launch that say why (both ranks' errors), not 3000 characters of rich traceback."""
    lines = [line for line in done.stderr.splitlines() if "│" not in line and ("rror" in line or "rank" in line
                                                                                or "Signal" in line)]
    return "\n".join(lines)[-6000:]


@pytest.fixture(scope="module")
def single(setup):
    """The reference: one process, batch 2 x 2 accumulation steps."""
    config = resolve_config(TrainConfig, RECIPE, {"model": str(setup / "float"), "data": [str(setup / "count.txt")],
                                                  "output_dir": str(setup / "single")},
                            COMMON + ["batch_size=2", "grad_accum=2"])
    train(config)
    return setup / "single"


@pytest.fixture(scope="module", params=[pytest.param(name, marks=NO_DEEPSPEED if name.startswith("zero") else ())
                                        for name in STRATEGIES])
def killed_and_resumed(request, setup):
    """2 processes, batch 2 each: killed after step 3 (checkpoint-2 complete), then resumed with the CLI."""
    name = request.param
    output, marks = setup / name, setup / f"{name}-steps"
    marks.mkdir()
    settings = [f"model={setup / 'float'}", f"data={setup / 'count.txt'}", *COMMON, "batch_size=2", "grad_accum=1",
                *STRATEGIES[name]]
    script = setup / "killed_run.py"
    script.write_text(KILLED_RUN)
    port = 29540 + list(STRATEGIES).index(name) * 2
    killed = launch(script, RECIPE, output, KILL_AT, marks, *settings, port=port)
    assert killed.returncode != 0 and not (output / "final").exists(), why(killed)
    assert latest_complete_checkpoint(output).name == f"checkpoint-{SAVE_EVERY}", why(killed)
    resumed = launch("-m", "bitcpm_cli", "train", "--config", RECIPE, "--output-dir", output, "--resume", *settings,
                     port=port + 1)
    assert resumed.returncode == 0, why(resumed)
    return name, output, marks, resumed


def test_losses_match_one_process_step_by_step_through_a_kill_and_resume(single, killed_and_resumed):
    name, output, _, resumed = killed_and_resumed
    assert "resumed from checkpoint-2" in resumed.stdout
    # plain fsdp=full_shard (no fsdp_config) saves its checkpoints with configs/fsdp/fsdp2.json's settings, said so
    assert ("fsdp: version=2, state_dict_type=SHARDED_STATE_DICT" in resumed.stdout) == (name == "fsdp-hf")
    assert ("no zero_fraction" in resumed.stdout) == (name != "zero2")  # no fused-weight cache when weights shard
    reference, distributed = losses(single), losses(output)
    assert len(reference) == len(distributed) == STEPS
    assert all(abs(a - b) <= LOSS_RTOL * abs(a) for a, b in zip(reference, distributed)), (name, reference,
                                                                                          distributed)
    assert reference[-1] < reference[0]


def test_final_is_the_consolidated_qat_checkpoint_of_one_process(single, killed_and_resumed, invoke, tmp_path):
    import torch
    from safetensors.torch import load_file

    name, output, _, _ = killed_and_resumed
    final = output / "final"
    config = json.loads((final / "config.json").read_text())
    assert config["bitcpm_quant"]["quant_type"] == "ternary" and config["bitcpm_quant"]["group_size"] == 0
    expected, got = load_file(single / "final" / "model.safetensors"), load_file(final / "model.safetensors")
    assert set(expected) == set(got)
    for key, tensor in expected.items():
        assert got[key].shape == tensor.shape and got[key].dtype == torch.float32, key
        assert torch.allclose(got[key], tensor, atol=WEIGHT_ATOL, rtol=0), (name, key)
    assert invoke("convert", "-i", final, "-o", tmp_path / "fused", "--verify").exit_code == 0
    result = invoke("infer", "-m", final, "-p", "3 4 5", "-o", tmp_path / "out.json", "--max-new-tokens", "4", "-q",
                    "--device", "cpu")
    assert result.exit_code == 0, result.output


def test_the_fused_weight_cache_is_invalidated_by_every_optimizer_step(killed_and_resumed):
    """The torch optimizer-step hook that invalidates cached fused weights fires once per step under DeepSpeed's and
    FSDP's optimizers on every rank (DeepSpeed's ZeRO optimizer and the torch optimizer inside it both count)."""
    name, _, marks, _ = killed_and_resumed
    for rank in (0, 1):
        counts = [int((marks / f"steps-{rank}-{step}").read_text()) for step in range(1, KILL_AT + 1)]
        assert counts[0] >= 1 and all(b > a for a, b in zip(counts, counts[1:])), (name, rank, counts)


def test_sft_under_fsdp_writes_a_chat_ready_final(setup, tmp_path, invoke):
    """`bitcpm sft` runs the same stack: one 2-process FSDP2 run (the strategy whose CPU support bitcpm switches on)."""
    chat = tmp_path / "chat.jsonl"
    chat.write_text("".join(json.dumps({"messages": [{"role": "user", "content": str(n)},
                                                     {"role": "assistant", "content": str(n + 1)}]}) + "\n"
                            for n in range(40)))
    done = launch("-m", "bitcpm_cli", "sft", "--config", ROOT / "configs" / "sft" / "tiny-cpu.yaml", "--model",
                  setup / "float", "--data", chat, "--output-dir", tmp_path / "sft", "max_steps=2", "batch_size=2",
                  *STRATEGIES["fsdp"], port=29560)
    assert done.returncode == 0, why(done)
    final = tmp_path / "sft" / "final"
    assert json.loads((final / "config.json").read_text())["bitcpm_quant"]["quant_type"] == "ternary"
    assert (final / "generation_config.json").is_file()
    assert invoke("convert", "-i", final, "-o", tmp_path / "fused", "--verify").exit_code == 0

