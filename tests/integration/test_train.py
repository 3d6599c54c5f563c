import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from bitcpm_cli.core.errors import InputError
from bitcpm_cli.core.training.recipe import TrainConfig, resolve_config
from bitcpm_cli.core.training.trainer import TrainingDiverged
from bitcpm_cli.core.training.train import latest_complete_checkpoint, train

from tests.helpers import build_tiny_model

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "configs" / "pretrain" / "tiny-cpu.yaml"


def counting_corpus(path: Path, lines: int = 300) -> Path:
    import random

    rng = random.Random(0)
    path.write_text("\n".join(" ".join(str(s + k) for k in range(12)) for s in (rng.randint(0, 50) for _ in range(lines)))
                    + "\n")
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    build_tiny_model(root / "float", kind="float")
    counting_corpus(root / "count.txt")
    return root


def config_for(setup, output, *overrides):
    return resolve_config(TrainConfig, RECIPE, {"model": str(setup / "float"), "data": [str(setup / "count.txt")],
                                                "output_dir": str(output)}, list(overrides))


def losses(output):
    return [json.loads(line)["loss"] for line in (Path(output) / "metrics.jsonl").read_text().splitlines()]


def test_loss_falls_and_final_is_a_qat_checkpoint_that_converts(setup, tmp_path, invoke):
    result = train(config_for(setup, tmp_path / "run"))
    values = losses(tmp_path / "run")
    assert result.steps == 40 and values[-1] < 0.5 * values[0]
    final = tmp_path / "run" / "final"
    config = json.loads((final / "config.json").read_text())
    assert config["bitcpm_quant"]["quant_type"] == "ternary" and config["bitcpm_quant"]["group_size"] == 32
    assert (final / "tokenizer.json").is_file() and not (final / "training_args.bin").exists()
    assert (tmp_path / "run" / "loss.png").stat().st_size > 1000
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert set(record) >= {"step", "loss", "lr", "grad_norm", "tokens_per_s", "zero_fraction", "mean_scale"}
    assert (tmp_path / "run" / "bitcpm_train_config.yaml").is_file()
    assert invoke("convert", "-i", final, "-o", tmp_path / "fused").exit_code == 0
    outputs = []
    for model in (final, tmp_path / "fused"):
        result = invoke("infer", "-m", model, "-p", "3 4 5 6", "-o", tmp_path / f"{model.name}.json",
                        "--max-new-tokens", "12", "-q", "--device", "cpu")
        assert result.exit_code == 0, result.output
        outputs.append(json.loads((tmp_path / f"{model.name}.json").read_text())["results"][0]["token_ids"])
    assert outputs[0] == outputs[1]


KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    from transformers import TrainerCallback
    from bitcpm_cli.core.training.recipe import TrainConfig, resolve_config
    from bitcpm_cli.core.training.train import train

    class Kill(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 13:
                os.kill(os.getpid(), signal.SIGKILL)

    model, data, output = sys.argv[1:4]
    config = resolve_config(TrainConfig, {recipe!r}, {{"model": model, "data": [data], "output_dir": output}},
                            ["max_steps=20", "save_steps=5", "logging_steps=1"])
    train(config, callbacks=[Kill()])
""")


def test_kill_and_resume_reproduces_the_losses(setup, tmp_path, invoke):
    overrides = ("max_steps=20", "save_steps=5", "logging_steps=1")
    train(config_for(setup, tmp_path / "straight", *overrides))
    script = KILL_SCRIPT.format(recipe=str(RECIPE))
    killed = subprocess.run([sys.executable, "-c", script, str(setup / "float"), str(setup / "count.txt"),
                             str(tmp_path / "killed")], cwd=ROOT, capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr
    assert latest_complete_checkpoint(tmp_path / "killed").name == "checkpoint-10"
    resumed = invoke("train", "--config", RECIPE, "--model", setup / "float", "--data", setup / "count.txt",
                     "--output-dir", tmp_path / "killed", "--resume", *overrides)
    assert resumed.exit_code == 0, resumed.output
    a, b = losses(tmp_path / "straight"), losses(tmp_path / "killed")
    assert len(a) == len(b) == 20
    assert all(abs(x - y) <= 1e-4 * abs(x) for x, y in zip(a, b)), (a, b)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(setup, tmp_path):
    import torch
    from transformers import TrainerCallback

    class Poison(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step == 6:
                with torch.no_grad():
                    model.model.norm.weight.fill_(float("nan"))

    with pytest.raises(TrainingDiverged) as info:
        train(config_for(setup, tmp_path / "run", "save_steps=5"), callbacks=[Poison()])
    assert "the loss became nan at step 7" in info.value.message
    assert "checkpoint-5" in info.value.message
    assert latest_complete_checkpoint(tmp_path / "run").name == "checkpoint-5"
    assert not (tmp_path / "run" / "final").exists()


def test_a_run_that_fails_before_its_first_checkpoint_leaves_no_folder(setup, tmp_path):
    """Building the Trainer creates output_dir; the guard claims it first, so a failure removes what the run made,
    and the same command then starts afresh instead of finding "a training run" it cannot resume."""
    from transformers import TrainerCallback

    class Fail(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            raise InputError("stop before the first step", hint="test")

    output = tmp_path / "nested" / "run"
    with pytest.raises(InputError, match="stop before the first step"):
        train(config_for(setup, output, "max_steps=3"), callbacks=[Fail()])
    assert not (tmp_path / "nested").exists()
    assert train(config_for(setup, output, "max_steps=3")).steps == 3
    made = tmp_path / "made_by_the_user"  # a folder that was there, empty: emptied again, not removed
    made.mkdir()
    with pytest.raises(InputError, match="stop before the first step"):
        train(config_for(setup, made, "max_steps=3"), callbacks=[Fail()])
    assert made.is_dir() and not list(made.iterdir())
    assert train(config_for(setup, made, "max_steps=3")).steps == 3


def test_knowledge_distillation_from_a_teacher(setup, tmp_path):
    result = train(config_for(setup, tmp_path / "kd", "max_steps=10", f"teacher={setup / 'float'}", "kd_weight=0.5"))
    assert result.steps == 10 and result.last_loss < result.first_loss


def test_full_precision_baseline(setup, tmp_path):
    result = train(config_for(setup, tmp_path / "fp", "max_steps=5", "quant_type=none"))
    assert result.scheme is None
    assert "bitcpm_quant" not in json.loads((tmp_path / "fp" / "final" / "config.json").read_text())


def test_output_dir_and_resume_guards(setup, tmp_path):
    train(config_for(setup, tmp_path / "run", "max_steps=5"))
    with pytest.raises(InputError, match="already holds a training run"):
        train(config_for(setup, tmp_path / "run", "max_steps=5"))
    with pytest.raises(InputError, match="no complete checkpoint"):
        train(config_for(setup, tmp_path / "empty", "max_steps=5", "resume=true"))


def test_bad_data_exit_2(setup, tmp_path, invoke):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "0 1 2 3"}\n{"text": oops}\n')
    args = ("--config", RECIPE, "--model", setup / "float", "--output-dir", tmp_path / "out")
    result = invoke("train", "--data", bad, *args)
    assert result.exit_code == 2 and f"{bad}:2: not valid JSON" in result.stderr
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    result = invoke("train", "--data", empty, *args)
    assert result.exit_code == 2 and "fewer than block_size=64 tokens" in result.stderr
    result = invoke("train", "--data", tmp_path / "missing.jsonl", *args)
    assert result.exit_code == 2 and "data file not found" in result.stderr
    assert not (tmp_path / "out").exists()


def test_parquet_data(setup, tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    lines = (setup / "count.txt").read_text().splitlines()
    pq.write_table(pa.table({"text": lines}), tmp_path / "count.parquet")
    config = resolve_config(TrainConfig, RECIPE, {"model": str(setup / "float"), "data": [str(tmp_path / "count.parquet")],
                                                  "output_dir": str(tmp_path / "run")}, ["max_steps=3"])
    assert train(config).steps == 3


def test_help(invoke):
    result = invoke("train", "--help")
    assert result.exit_code == 0
    for flag in ("--config", "--model", "--data", "--output-dir", "--max-steps", "--quant-type", "--group-size",
                 "--lr", "--batch-size", "--grad-accum", "--block-size", "--save-steps", "--seed", "--device",
                 "--bf16", "--logging-steps", "--resume", "--teacher", "--deepspeed"):
        assert flag in result.output, flag


@pytest.mark.slow
def test_torchrun_two_processes(setup, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
         "-m", "bitcpm_cli", "train", "--config", str(RECIPE), "--model", str(setup / "float"), "--data",
         str(setup / "count.txt"), "--output-dir", str(tmp_path / "ddp"), "max_steps=6", "save_steps=3"],
        cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "ddp" / "final" / "model.safetensors").is_file()
    assert len(losses(tmp_path / "ddp")) >= 2
