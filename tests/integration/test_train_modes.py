"""Choosing what trains (freeze, trainable_keys, learned scales), KD with MSE, and the bad inputs refused before
anything loads: on the tiny model, a few steps each."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from bitcpm_cli.core.training.recipe import TrainConfig, resolve_config
from bitcpm_cli.core.training.sft import SftConfig, fine_tune
from bitcpm_cli.core.training.train import train
from tests.helpers import bitcpm_in_process, build_tiny_model
from tests.integration.test_train import RECIPE, counting_corpus

ROOT = Path(__file__).resolve().parents[2]
SFT_RECIPE = ROOT / "configs" / "sft" / "tiny-cpu.yaml"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("modes")
    build_tiny_model(root / "float", kind="float")
    build_tiny_model(root / "qat", kind="qat")
    build_tiny_model(root / "qat-bf16", kind="qat", dtype="bfloat16")
    counting_corpus(root / "count.txt", lines=80)
    with (root / "chat.jsonl").open("w") as handle:
        for n in range(40):
            handle.write(json.dumps({"messages": [{"role": "user", "content": f"{n} {n + 1}"},
                                                  {"role": "assistant", "content": f"{n + 2}"}]}) + "\n")
    return root


class OptimizerStates(TrainerCallback):
    """Records, at the end, which parameters the optimizer holds states for."""

    def on_train_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        with_state = {id(p) for p in optimizer.state}
        self.names = {n for n, p in model.named_parameters() if id(p) in held}
        self.stated = {n for n, p in model.named_parameters() if id(p) in with_state}
        self.trainable = {n for n, p in model.named_parameters() if p.requires_grad}


def run(setup, output, model="qat", *overrides, callbacks=()):
    config = resolve_config(TrainConfig, RECIPE, {"model": str(setup / model), "data": [str(setup / "count.txt")],
                                                  "output_dir": str(output)},
                            ["max_steps=3", "logging_steps=1", "save_steps=100", *overrides])
    return train(config, callbacks=list(callbacks))


def changed_tensors(before: Path, after: Path) -> tuple[set[str], set[str]]:
    """(names whose values differ, names only in `after`), from model.safetensors of two folders. A tensor upcast to
    float32 (final/ of a run that mixed dtypes is float32 throughout) is unchanged when its values are."""
    old, new = load_file(before / "model.safetensors"), load_file(after / "model.safetensors")
    assert set(old) <= set(new)
    same = lambda n: (old[n].dtype == new[n].dtype or new[n].dtype == torch.float32) and \
        torch.equal(old[n].to(new[n].dtype), new[n])  # noqa: E731
    return {n for n in old if not same(n)}, set(new) - set(old)


def test_freeze_changes_only_the_chosen_layer_and_the_optimizer_holds_only_it(setup, tmp_path):
    states = OptimizerStates()
    result = run(setup, tmp_path / "run", "qat", "finetuning_type=freeze", "freeze_trainable_layers=1",
                 "freeze_trainable_modules=mlp,post_attention_layernorm", "freeze_extra_modules=norm",
                 callbacks=[states])
    chosen = {n for n in load_file(setup / "qat" / "model.safetensors")
              if n.startswith(("model.layers.1.mlp.", "model.layers.1.post_attention_layernorm")) or
              n == "model.norm.weight"}
    changed, added = changed_tensors(setup / "qat", tmp_path / "run" / "final")
    assert changed == chosen and not added  # every other tensor byte-equal to the input
    assert states.names == states.stated == states.trainable == chosen  # no optimizer state for a frozen one
    assert any(note.startswith("freeze: mlp,post_attention_layernorm of the last 1 layers + norm: ") and
               "parameters train" in note for note in result.notes), result.notes


def test_trainable_keys_train_only_learned_scales_and_norms(setup, tmp_path):
    from bitcpm_cli.core.quant import QuantScheme
    from bitcpm_cli.core.quant.functional import absmean_scales

    states = OptimizerStates()
    run(setup, tmp_path / "run", "qat", "trainable_keys=[quant_alpha,norm]", "learned_scales=true",
        callbacks=[states])
    final = tmp_path / "run" / "final"
    changed, added = changed_tensors(setup / "qat", final)
    assert changed == {n for n in load_file(setup / "qat" / "model.safetensors") if "norm" in n}
    assert added == {n for n in states.trainable if n.endswith(".quant_alpha")} and len(added) == 14
    assert json.loads((final / "config.json").read_text())["bitcpm_quant"]["learned_scales"] is True
    # the scales started at absmean and moved
    weights, saved = load_file(setup / "qat" / "model.safetensors"), load_file(final / "model.safetensors")
    spec = QuantScheme(group_size=32, learned_scales=True).for_module("model.layers.0.mlp.up_proj")
    initial = absmean_scales(weights["model.layers.0.mlp.up_proj.weight"], spec)
    assert saved["model.layers.0.mlp.up_proj.quant_alpha"].dtype == torch.float32
    assert not torch.equal(saved["model.layers.0.mlp.up_proj.quant_alpha"], initial)
    assert states.stated == states.trainable


def test_resume_of_a_learned_scales_run_continues_the_single_run_losses(setup, tmp_path):
    keys = ("trainable_keys=[quant_alpha,norm]", "learned_scales=true", "save_steps=2")
    run(setup, tmp_path / "straight", "qat", *keys, "max_steps=4")
    run(setup, tmp_path / "resumed", "qat", *keys, "max_steps=2")
    result = run(setup, tmp_path / "resumed", "qat", *keys, "max_steps=4", "resume=true")
    assert result.resumed_from.endswith("checkpoint-2")
    losses = [[json.loads(line)["loss"] for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
              for name in ("straight", "resumed")]
    assert len(losses[0]) == len(losses[1]) == 4
    assert all(abs(x - y) <= 1e-4 * abs(x) for x, y in zip(*losses)), losses
    # a checkpoint that stores learned scales: they are kept, never silently dropped
    from bitcpm_cli.core.errors import ConfigError

    for setting in ("learned_scales=false", "quant_type=none"):
        with pytest.raises(ConfigError, match="the checkpoint stores learned scales"):
            run(setup, tmp_path / "again", tmp_path / "straight" / "final", setting)  # an absolute path
    assert not (tmp_path / "again").exists()


def test_a_bf16_checkpoint_trains_with_frozen_bf16_tensors_and_writes_a_float32_final(setup, tmp_path):
    states = OptimizerStates()
    result = run(setup, tmp_path / "run", "qat-bf16", "trainable_keys=[norm]", "bf16=true", callbacks=[states])
    assert any("trainable_keys: norm: " in note and "kept in bfloat16" in note for note in result.notes)
    changed, added = changed_tensors(setup / "qat-bf16", tmp_path / "run" / "final")
    assert changed == {n for n in load_file(setup / "qat-bf16" / "model.safetensors") if "norm" in n}
    assert not added  # every frozen tensor: the input's bf16 values, upcast exactly
    final = tmp_path / "run" / "final"
    assert {t.dtype for t in load_file(final / "model.safetensors").values()} == {torch.float32}
    assert json.loads((final / "config.json").read_text())["dtype"] == "float32"
    assert any(note.startswith("final/ is float32: the run held bfloat16 and float32") for note in result.notes)


def test_a_bf16_freeze_run_s_final_infers_as_its_fused_float32_conversion(setup, tmp_path):
    """The QAT folder (loaded by `infer` / `eval` with its config.json dtype) and its fused float32 conversion are
    the same model: final/ holds one dtype, float32, and config.json says so (a bf16 config.json would make the
    hf engine round the trained float32 latents to bf16 before quantizing)."""
    from bitcpm_cli.core.conversion.convert import convert_checkpoint
    from bitcpm_cli.core.engines.hf import load_for_inference

    run(setup, tmp_path / "run", "qat-bf16", "finetuning_type=freeze", "freeze_trainable_layers=1", "bf16=true")
    final = tmp_path / "run" / "final"
    convert_checkpoint(final, tmp_path / "fused", dtype="float32")
    ids = torch.tensor([[1, 20, 31, 45, 8, 60, 71, 9, 15, 33]])
    logits = []
    for folder in (final, tmp_path / "fused"):
        loaded = load_for_inference(folder, device="cpu", dtype="float32")
        with torch.no_grad():
            logits.append(loaded.model(input_ids=ids).logits)
        greedy = loaded.model.generate(ids, max_new_tokens=8, do_sample=False)
        logits.append(greedy)
    assert torch.equal(logits[0], logits[2]) and torch.equal(logits[1], logits[3])
    assert {t.dtype for t in load_file(final / "model.safetensors").values()} == {torch.float32}
    assert json.loads((final / "config.json").read_text())["dtype"] == "float32"


def test_kd_mse_of_a_student_identical_to_its_teacher_is_zero(setup, tmp_path):
    run(setup, tmp_path / "run", "float", "quant_type=none", f"teacher={setup / 'float'}", "kd_loss=mse",
        "max_steps=2")
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["step"] == 1 and records[0]["kd_loss"] == 0.0  # before any update: the same logits
    assert records[1]["kd_loss"] > 0  # the student moved, the teacher did not


def test_kd_mse_is_the_mean_squared_logit_difference_over_real_tokens():
    from bitcpm_cli.core.training.trainer import mse_distillation_loss

    student = torch.randn(2, 3, 5)
    teacher_logits = torch.randn(2, 3, 5)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    inputs = {"input_ids": torch.zeros(2, 3, dtype=torch.long), "attention_mask": mask}
    teacher = lambda **kwargs: type("Out", (), {"logits": teacher_logits})  # noqa: E731
    expected = torch.stack([((student[b, t] - teacher_logits[b, t]) ** 2).mean()
                            for b, t in ((0, 0), (0, 1), (1, 0))]).mean()
    assert torch.allclose(mse_distillation_loss(student, teacher, inputs), expected)


def test_sft_with_trainable_keys(setup, tmp_path):
    config = resolve_config(SftConfig, SFT_RECIPE, {"model": str(setup / "qat"), "data": [str(setup / "chat.jsonl")],
                                                    "output_dir": str(tmp_path / "run")},
                            ["max_steps=2", "logging_steps=1", "trainable_keys=[norm]"])
    result = fine_tune(config)
    assert result.steps == 2
    changed, _ = changed_tensors(setup / "qat", tmp_path / "run" / "final")
    # the chat tokens grow the embeddings (a shape change), everything else but the norms is untouched
    assert changed - {"model.embed_tokens.weight", "lm_head.weight"} == {
        n for n in load_file(setup / "qat" / "model.safetensors") if "norm" in n}


def test_sft_says_how_many_new_embedding_rows_stay_frozen(setup, tmp_path):
    """A model whose vocabulary is 2 tokens short of its tokenizer (as a checkpoint is of sft's added chat tokens):
    the embeddings and lm_head grow by 2 rows, which trainable_keys [norm] leaves frozen at their initial values: a
    loud note counts them."""
    build_tiny_model(tmp_path / "qat85", kind="qat", config={"vocab_size": 83})
    config = resolve_config(SftConfig, SFT_RECIPE, {"model": str(tmp_path / "qat85"),
                                                    "data": [str(setup / "chat.jsonl")],
                                                    "output_dir": str(tmp_path / "run")},
                            ["max_steps=1", "trainable_keys=[norm]"])
    result = fine_tune(config)
    assert "embeddings resized from 83 to 85 tokens to fit the tokenizer" in result.notes
    assert "NOTE: 2 new embedding rows and 2 new lm_head rows (for the tokenizer's tokens beyond the checkpoint's " \
           "vocabulary, e.g. the chat tokens sft added) stay FROZEN at " \
           "their initial values under trainable_keys: norm: the model cannot learn these tokens; to train them, use " \
           "finetuning_type full, or add embed_tokens and lm_head to trainable_keys / freeze_extra_modules" \
           in result.notes, result.notes
    config = resolve_config(SftConfig, SFT_RECIPE, {"model": str(tmp_path / "qat85"),
                                                    "data": [str(setup / "chat.jsonl")],
                                                    "output_dir": str(tmp_path / "run2")},
                            ["max_steps=1", "trainable_keys=[norm,embed_tokens,lm_head]"])
    assert not any(note.startswith("NOTE: ") and "FROZEN" in note for note in fine_tune(config).notes)


def one_error(run, start: str) -> None:
    lines = run.stderr.splitlines()
    assert run.returncode == 2, run.stderr
    assert lines[0].startswith(f"error: {start}") and lines[-1].startswith("hint: "), run.stderr
    assert sum(line.startswith("error:") for line in lines) == 1 and "Traceback" not in run.stderr


@pytest.fixture(scope="module")
def config_only(setup, tmp_path_factory):
    """The tiny models' config.json with no weights and no tokenizer: a refusal from it happened before loading.
    `learned`: the QAT config with learned scales; `teacher-vocab`: the float config with another vocab_size;
    `scheme16.yaml`: a scheme file of group size 16."""
    root = tmp_path_factory.mktemp("config-only")
    for name in ("qat", "qat-bf16", "float"):
        (root / name).mkdir()
        (root / name / "config.json").write_text((setup / name / "config.json").read_text())
    for name, change in (("learned", lambda c: c["bitcpm_quant"].update(learned_scales=True)),
                         ("teacher-vocab", lambda c: c.update(vocab_size=c["vocab_size"] + 1))):
        values = json.loads((setup / ("qat" if name == "learned" else "float") / "config.json").read_text())
        change(values)
        (root / name).mkdir()
        (root / name / "config.json").write_text(json.dumps(values))
    (root / "scheme16.yaml").write_text("quant_type: ternary\ngroup_size: 16\n")
    return root


@pytest.mark.parametrize("model, overrides, start", [
    ("qat", ["trainable_keys=[quant_alpha,norm]"], "trainable_keys: 'quant_alpha' matches no parameter of"),
    ("qat", ["finetuning_type=freeze", "freeze_trainable_modules=attn"],
     "freeze_trainable_modules: 'attn' is no module inside a layer"),
    ("qat", ["finetuning_type=lora", "lora_rank=0"], "lora_rank: must be a whole number of at least 1, got 0"),
    ("qat", ["finetuning_type=lora", "lora_target=qkv"], "lora_target: qkv names no linear module"),
    ("qat", ["learned_scales=true", "quant_type=int4"], "learned_scales: quant_type int4 has no learned scale"),
    ("qat", ["kd_loss=l2", "teacher=/nonexistent"], "kd_loss: 'l2' is not one of kl, mse"),
    ("qat", ["kd_loss=mse"], "kd_loss: knowledge distillation runs only with a teacher"),
    ("qat", ["lora_rank=4"], "lora_rank: set for finetuning_type lora, but finetuning_type is full"),
    ("qat-bf16", ["trainable_keys=[norm]"], "trainable_keys: norm: the frozen parameters stay bfloat16"),
    ("qat", ["finetuning_type=freeze", "deepspeed=configs/deepspeed/zero3.json"],
     "finetuning_type freeze under ZeRO-3: refused"),
    ("qat", ["finetuning_type=freeze", "freeze_trainable_layers=0"],
     "finetuning_type freeze: freeze_trainable_layers 0 trains no parameter of"),
    ("qat", ["teacher={root}/qat"], "--teacher {root}/qat is a QAT checkpoint (config.json has bitcpm_quant)"),
    ("qat", ["teacher={root}/teacher-vocab"], "the teacher's vocab_size 97 ({root}/teacher-vocab/config.json) "
                                              "differs from the student's 96"),
    ("learned", ["--group-size", "16"], "--group-size 16 cannot use the checkpoint's learned scales"),
    ("learned", ["--quant-type", "int4"], "--quant-type int4 cannot use the checkpoint's learned scales"),
    ("learned", ["--scheme", "{root}/scheme16.yaml"], "--scheme {root}/scheme16.yaml cannot use the checkpoint's "
                                                      "learned scales (quant_alpha), which were trained for its own "
                                                      "scheme: group_size 16 (the checkpoint's: 32)"),
])
def test_bad_input_is_exit_2_before_anything_loads(config_only, setup, tmp_path, model, overrides, start):
    if "lora" in start:
        pytest.importorskip("peft")
    overrides = [o.format(root=config_only) for o in overrides]
    start = start.format(root=config_only)
    done = bitcpm_in_process("train", "--config", RECIPE, "--model", config_only / model, "--data",
                             setup / "count.txt", "--output-dir", tmp_path / "out", *overrides, cwd=ROOT)
    one_error(done, start)
    assert not (tmp_path / "out").exists()


def test_a_teacher_storing_learned_scales_is_refused_before_anything_loads(config_only, setup, tmp_path):
    """A QAT checkpoint as teacher (here: `*.quant_alpha` tensors, no bitcpm_quant) would load as a float model."""
    from safetensors.torch import save_file

    teacher = tmp_path / "teacher"
    teacher.mkdir()
    (teacher / "config.json").write_text((setup / "float" / "config.json").read_text())
    save_file({"model.layers.0.mlp.up_proj.weight": torch.zeros(128, 64),
               "model.layers.0.mlp.up_proj.quant_alpha": torch.ones(128, 2)}, teacher / "model.safetensors")
    done = bitcpm_in_process("train", "--config", RECIPE, "--model", config_only / "qat", "--data",
                             setup / "count.txt", "--output-dir", tmp_path / "out", f"teacher={teacher}", cwd=ROOT)
    one_error(done, f"--teacher {teacher} stores learned scales (model.layers.0.mlp.up_proj.quant_alpha, 1 in all)")
    assert "convert" in done.stderr.splitlines()[-1] and not (tmp_path / "out").exists()


def _resume(setup, output, *settings):
    return bitcpm_in_process("train", "--config", RECIPE, "--model", setup / "qat", "--data", setup / "count.txt",
                             "--output-dir", output, "--resume", "max_steps=3", "logging_steps=1", *settings,
                             cwd=ROOT)


def _listing(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_resume_with_other_freeze_settings_is_refused_before_loading(setup, tmp_path):
    output = tmp_path / "run"
    run(setup, output, "qat", "finetuning_type=freeze", "freeze_trainable_layers=1", "max_steps=2", "save_steps=2")
    before = _listing(output)
    other = _resume(setup, output, "finetuning_type=freeze", "freeze_trainable_layers=-1")
    one_error(other, f"--resume: {output} was started with other settings than this run's: "
                     "freeze_trainable_layers 1 (saved) vs -1 (now)")
    assert "bitcpm_train_config.yaml --resume" in other.stderr.splitlines()[-1]
    full = _resume(setup, output)
    one_error(full, f"--resume: {output} was started with other settings than this run's: finetuning_type 'freeze' "
                    "(saved) vs 'full' (now); freeze_trainable_layers 1 (saved) vs 2 (now)")
    for refused in (other, full):
        assert "loading the model" not in refused.stdout + refused.stderr
    assert _listing(output) == before
    same = bitcpm_in_process("train", "--config", output / "bitcpm_train_config.yaml", "--resume", "max_steps=3",
                             cwd=ROOT)  # the hint's way: the run's own settings
    assert same.returncode == 0, same.stderr
    assert len((output / "metrics.jsonl").read_text().splitlines()) == 3


def test_resume_of_a_trainable_keys_run_without_its_settings_is_refused_before_loading(setup, tmp_path):
    output = tmp_path / "run"
    run(setup, output, "qat", "trainable_keys=[quant_alpha,norm]", "learned_scales=true", "max_steps=2",
        "save_steps=2")
    done = _resume(setup, output)  # was exit 3 after loading: the optimizer's parameter groups did not match
    one_error(done, f"--resume: {output} was started with other settings than this run's: trainable_keys "
                    "['quant_alpha', 'norm'] (saved) vs [] (now); learned_scales True (saved) vs None (now)")
    assert "loading the model" not in done.stdout + done.stderr
    same = _resume(setup, output, "trainable_keys=[quant_alpha,norm]", "learned_scales=true", "--group-size", "32")
    assert same.returncode == 0, same.stderr  # --group-size 32 is the checkpoint's own: no difference
