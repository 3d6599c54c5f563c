"""QAT with fake-quantized activations in `train` / `sft` (W1.58A8): the `activations` setting and how it combines
with the checkpoint's scheme, the STE gradients (latent weight, input, learned scales, LoRA factors) against explicit
autograd references, the fused-weight cache under gradient accumulation, the memory plan, and a few real steps of
each training mode on the tiny model (full + learned scales, LoRA, freeze, trainable_keys, KD, sft)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import TrainerCallback

from bitcpm_cli.core.errors import ConfigError
from bitcpm_cli.core.quant import QuantScheme, fake_quantize, prepare, qat_layers
from bitcpm_cli.core.quant.activations import dequantized
from bitcpm_cli.core.training.recipe import TrainConfig, resolve_config
from bitcpm_cli.core.training.train import resolve_scheme
from tests.conftest import tiny_llama_config
from tests.helpers import build_tiny_model
from tests.integration.test_train import RECIPE, counting_corpus

REQUIRED = {"model": "m", "data": ["d.jsonl"], "output_dir": "out"}
IDS = torch.tensor([[1, 5, 9, 33, 2, 7, 64, 80], [4, 8, 15, 16, 23, 42, 3, 6]])


# ---- the setting ------------------------------------------------------------------------------------------------
def test_an_unknown_scheme_is_reported_with_every_other_problem_and_a_suggestion():
    with pytest.raises(ConfigError) as caught:
        resolve_config(TrainConfig, None, REQUIRED, ["activations=q8k", "lr=-1", "group_size=-5"])
    problems = caught.value.problems
    assert "activations: 'q8k' is not one of none, int8-token, q8_k, q8_0 (did you mean 'q8_k'?)" in problems
    assert any(p.startswith("lr:") for p in problems) and any(p.startswith("group_size:") for p in problems)


def test_activations_on_a_full_precision_run_is_refused():
    with pytest.raises(ConfigError) as caught:
        resolve_config(TrainConfig, None, REQUIRED, ["activations=int8-token", "quant_type=none"])
    assert caught.value.message.startswith("activations: int8-token quantizes the input of the quantized linears, "
                                           "and quant_type none trains in full precision")


def test_unset_keeps_the_checkpoint_s_scheme_per_layer_choices_included():
    recorded = QuantScheme(group_size=32, activations="q8_0", layers={"down_proj": {"activations": "int8-token"}})
    notes: list[str] = []
    scheme = resolve_scheme(resolve_config(TrainConfig, None, REQUIRED), recorded, notes)
    assert scheme == recorded and not notes
    assert scheme.for_module("model.layers.0.mlp.down_proj").activations == "int8-token"


def test_set_it_applies_to_every_quantized_linear_and_a_change_is_a_note():
    recorded = QuantScheme(group_size=32, activations="q8_0", layers={"down_proj": {"activations": "int8-token"}})
    notes: list[str] = []
    scheme = resolve_scheme(resolve_config(TrainConfig, None, REQUIRED, ["activations=q8_k"]), recorded, notes)
    assert scheme.to_dict()["activations"] == "q8_k" and scheme.layers == {}
    assert scheme.for_module("model.layers.0.mlp.down_proj").activations == "q8_k"
    assert scheme.for_module("lm_head").activations == "none"
    assert notes == ["activations q8_k replace the checkpoint's q8_0 (int8-token in some layers): the inputs of the "
                     "quantized linears are quantized otherwise than it was trained with"]
    # a float model (no bitcpm_quant): starting QAT A8 from it is no change to report
    notes.clear()
    assert resolve_scheme(resolve_config(TrainConfig, None, REQUIRED, ["activations=q8_k"]), None, notes) \
        .activations == "q8_k" and not notes


def test_a_cann_strategy_file_s_notes_are_the_run_s_notes():
    path = Path(__file__).resolve().parents[2] / "configs" / "quant" / "cann-layer-strategy.yaml"
    notes: list[str] = []
    scheme = resolve_scheme(resolve_config(TrainConfig, None, REQUIRED, [f"scheme={path}"]), None, notes)
    assert scheme.activations == "int8-token"
    assert any("calibrated static activation scales" in note and "not reproduced" in note for note in notes)
    notes.clear()  # overriding to none keeps the note of what the file asked for
    resolve_scheme(resolve_config(TrainConfig, None, REQUIRED, [f"scheme={path}", "activations=none"]), None, notes)
    assert any("not reproduced" in note for note in notes)


def test_stored_learned_scales_survive_a_change_of_activations_alone(tmp_path):
    recorded = QuantScheme(group_size=32, learned_scales=True)
    scheme_file = tmp_path / "a8.yaml"
    scheme_file.write_text("quant_type: ternary\ngroup_size: 32\nactivations: int8-token\n")
    notes: list[str] = []
    scheme = resolve_scheme(resolve_config(TrainConfig, None, REQUIRED, [f"scheme={scheme_file}"]), recorded, notes)
    assert scheme.learned_scales and scheme.activations == "int8-token"
    scheme_file.write_text("quant_type: ternary\ngroup_size: 64\nactivations: int8-token\n")
    with pytest.raises(ConfigError, match="cannot use the checkpoint's learned scales"):
        resolve_scheme(resolve_config(TrainConfig, None, REQUIRED, [f"scheme={scheme_file}"]), recorded, [])


# ---- gradients through the STE ------------------------------------------------------------------------------------
def _layer(scheme: str, in_features: int, learned: bool = False, seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential()
    model.add_module("proj", nn.Linear(in_features, 24, bias=True))
    prepare(model, QuantScheme(group_size=32, modules_to_not_convert=(), learned_scales=learned, activations=scheme))
    return model.proj.train()


def _ste_input(x: torch.Tensor, scheme: str) -> torch.Tensor:
    return dequantized(x, scheme).detach() + (x - x.detach())


@pytest.mark.parametrize("scheme, in_features", [("int8-token", 96), ("q8_0", 64), ("q8_k", 256)])
def test_input_weight_and_scale_gradients_are_those_of_the_explicit_ste_reference(scheme, in_features):
    layer = _layer(scheme, in_features, learned=True)
    x = torch.randn(3, 5, in_features, requires_grad=True)
    upstream = torch.randn(3, 5, 24)
    out = layer(x)
    (out * upstream).sum().backward()

    x_ref = x.detach().clone().requires_grad_(True)
    fused = fake_quantize(layer.weight.detach(), layer.quant, scales=layer.quant_alpha.detach())
    w_ref = fused.clone().requires_grad_(True)  # the fused weight; its gradient is what STE passes to the latent
    expected = nn.functional.linear(_ste_input(x_ref, scheme), w_ref, layer.bias.detach())
    (expected * upstream).sum().backward()
    assert torch.equal(out.detach(), expected.detach())
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=0, atol=0)
    torch.testing.assert_close(layer.weight.grad, w_ref.grad)  # the quantized input, not x, reaches the weight
    # and it differs from the gradient the A16 input would give
    assert not torch.allclose(layer.weight.grad, upstream.reshape(-1, 24).T @ x.detach().reshape(-1, in_features))
    from bitcpm_cli.core.quant.qat import lsq_scale_grad

    torch.testing.assert_close(layer.quant_alpha.grad,
                               lsq_scale_grad(layer.weight.detach(), layer.quant_alpha, w_ref.grad, layer.quant))


def test_lora_factors_and_the_input_get_the_ste_gradient_of_the_quantized_input():
    pytest.importorskip("peft")
    from transformers import LlamaForCausalLM

    from bitcpm_cli.core.training.lora import add_lora
    from tests.unit.test_lora import _randomise_adapters, settings

    torch.manual_seed(0)
    model = prepare(LlamaForCausalLM(tiny_llama_config()), QuantScheme(group_size=32, activations="int8-token"))
    model = add_lora(model, settings())
    _randomise_adapters(model)
    layer = dict(model.named_modules())["base_model.model.model.layers.1.mlp.down_proj"]
    base = layer.get_base_layer()
    assert base.quant.activations == "int8-token"
    a_param, b_param = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    scaling = layer.scaling["default"]
    x = torch.randn(2, 7, base.in_features, requires_grad=True)
    upstream = torch.randn(2, 7, base.out_features)
    (layer(x) * upstream).sum().backward()

    x_ref = x.detach().clone().requires_grad_(True)
    a, b = a_param.detach().clone().requires_grad_(), b_param.detach().clone().requires_grad_()
    latent = base.weight.detach() + scaling * (b @ a)
    ste = latent + (fake_quantize(latent.detach(), base.quant) - latent).detach()
    expected = nn.functional.linear(_ste_input(x_ref, "int8-token"), ste, base.bias)
    (expected * upstream).sum().backward()
    torch.testing.assert_close(a_param.grad, a.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(b_param.grad, b.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(x.grad, x_ref.grad)
    with torch.no_grad():  # the forward is the quantized input's, not x's
        fused = fake_quantize(latent.detach(), base.quant)
        assert torch.equal(layer(x), nn.functional.linear(dequantized(x, "int8-token"), fused, base.bias))
        assert not torch.allclose(layer(x), nn.functional.linear(x, fused, base.bias))


# ---- the fused-weight cache -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("fused_optimizer", [False, True])
def test_with_activations_the_fused_weight_is_still_computed_once_per_optimizer_step(monkeypatch, fused_optimizer):
    from transformers import LlamaForCausalLM

    from bitcpm_cli.core.quant import qat

    torch.manual_seed(0)
    model = prepare(LlamaForCausalLM(tiny_llama_config()), QuantScheme(group_size=16, activations="q8_0")).train()
    weights, inputs = [], []
    real_weights, real_inputs = qat.fake_quantize, qat.fake_quantize_activations
    monkeypatch.setattr(qat, "fake_quantize", lambda *a, **k: weights.append(1) or real_weights(*a, **k))
    monkeypatch.setattr(qat, "fake_quantize_activations",
                        lambda x, s: inputs.append(s) or real_inputs(x, s))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=fused_optimizer)
    for _ in range(3):  # three micro-batches of gradient accumulation
        model(IDS, labels=IDS).loss.backward()
    assert len(weights) == 14  # once per quantized linear, not once per micro-batch
    assert inputs == ["q8_0"] * 14 * 3  # the inputs are quantized in every micro-batch
    optimizer.step()
    model(IDS, labels=IDS).loss.backward()
    assert len(weights) == 28  # the step changed every latent weight: recomputed
    layer = model.model.layers[0].mlp.up_proj
    assert torch.equal(layer.fused_weight().detach(), fake_quantize(layer.weight.detach(), layer.quant))


# ---- the memory plan --------------------------------------------------------------------------------------------
def _saved_bytes(model, ids, bf16: bool) -> int:
    """Bytes of the (non-parameter) tensors autograd saves for backward over one decoder layer's forward."""
    storages: dict[int, int] = {}

    def pack(tensor):
        if not (tensor.requires_grad and tensor.is_leaf):
            storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    layer = model.model.layers[0]
    hidden = model.model.embed_tokens(ids).detach().requires_grad_(True)
    position = model.model.rotary_emb(hidden, torch.arange(ids.shape[1])[None])
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        layer(hidden, position_embeddings=position)
    return sum(storages.values())


@pytest.mark.parametrize("bf16", [False, True])
def test_the_plan_counts_the_quantized_inputs_the_linears_save_as_measured(bf16):
    from transformers import LlamaForCausalLM

    from bitcpm_cli.core.training.memory_plan import Settings, Shape, estimate, quantized_input_copies

    values = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=1, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=128)
    ids = torch.randint(0, 96, (2, 16))
    measured = []
    for activations in ("none", "q8_k"):
        torch.manual_seed(0)
        model = LlamaForCausalLM(tiny_llama_config(**values))
        prepare(model, QuantScheme(group_size=0, activations=activations)).train()
        measured.append(_saved_bytes(model, ids, bf16))
    shape = Shape(96, 256, 1, 4, 2, 128, 512, False)
    settings = Settings(2, 16, bf16, False, "single", 1, True, scheme=QuantScheme(activations="q8_k"))
    assert quantized_input_copies(shape, settings) == measured[1] - measured[0] > 0
    assert estimate(shape, settings)["quantized activations (QAT)"] == measured[1] - measured[0]
    assert "quantized activations (QAT)" not in estimate(shape, Settings(2, 16, bf16, False, "single", 1, True))


# ---- a few real steps of each mode ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("a8")
    build_tiny_model(root / "float", kind="float")
    counting_corpus(root / "count.txt", lines=40)
    with (root / "chat.jsonl").open("w") as handle:
        for n in range(16):
            handle.write(json.dumps({"messages": [{"role": "user", "content": f"{n} {n + 1}"},
                                                  {"role": "assistant", "content": f"{n + 2}"}]}) + "\n")
    return root


def _run(setup, name: str, *overrides: str, sft: bool = False, model: str = "float", callbacks=()):
    from bitcpm_cli.core.training.sft import SftConfig, fine_tune
    from bitcpm_cli.core.training.train import train

    recipe = Path(__file__).resolve().parents[2] / "configs" / "sft" / "tiny-cpu.yaml" if sft else RECIPE
    data = setup / ("chat.jsonl" if sft else "count.txt")
    config = resolve_config(SftConfig if sft else TrainConfig, recipe, {
        "model": str(setup / model), "data": [str(data)], "output_dir": str(setup / name)},
        ["max_steps=2", "save_steps=2", "logging_steps=1", "batch_size=2", *overrides])
    return (fine_tune if sft else train)(config, callbacks=list(callbacks))


def _load(folder: Path, activations: str | None = None):
    """A QAT checkpoint as bitcpm loads it, optionally with its activations overridden."""
    from transformers import AutoModelForCausalLM

    from bitcpm_cli.core.model.learned_scales import load_learned_scales

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    scheme = QuantScheme.from_config(model.config)
    prepare(model, scheme if activations is None else scheme.with_activations(activations))
    load_learned_scales(model, folder)
    return model.eval()


def _assert_trained_with(output: Path, activations: str, checkpoint: bool = True) -> None:
    """final/ and the step-2 checkpoint (a LoRA one holds only the adapter: `checkpoint` False) record the scheme,
    as the run's saved settings do, and final/'s forward is not the A16 one."""
    folders = [output / "final"] + ([output / "checkpoint-2"] if checkpoint else [])
    for folder in folders:
        assert json.loads((folder / "config.json").read_text())["bitcpm_quant"]["activations"] == activations
    assert f"activations: {activations}" in (output / "bitcpm_train_config.yaml").read_text().splitlines()
    model = _load(output / "final")
    assert {m.quant.activations for m in qat_layers(model).values()} == {activations}
    with torch.no_grad():
        a8, a16 = model(IDS).logits, _load(output / "final", "none")(IDS).logits
    assert not torch.allclose(a8, a16, atol=1e-4)


class ModelProbe(TrainerCallback):
    """The activation schemes of the trained model's QATLinears, once training has ended."""

    student: set[str] = set()

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.student = {m.quant.activations for m in qat_layers(model).values()}


def test_full_training_with_learned_scales_and_q8_0(setup):
    probe = ModelProbe()
    result = _run(setup, "full-learned", "activations=q8_0", "learned_scales=true", callbacks=[probe])
    assert result.scheme["activations"] == "q8_0" and result.activations == "q8_0" and result.scheme["learned_scales"]
    assert probe.student == {"q8_0"}
    _assert_trained_with(setup / "full-learned", "q8_0")


def test_lora_with_int8_token(setup):
    pytest.importorskip("peft")
    result = _run(setup, "lora", "activations=int8-token", "finetuning_type=lora", "lora_rank=4", "lr=0.05")
    assert result.activations == "int8-token"
    _assert_trained_with(setup / "lora", "int8-token", checkpoint=False)
    assert not (setup / "lora" / "checkpoint-2" / "config.json").exists()  # the adapter only


@pytest.mark.parametrize("mode", [("finetuning_type=freeze", "freeze_trainable_layers=1"),
                                  ("trainable_keys=norm,mlp",)], ids=["freeze", "trainable_keys"])
def test_selective_training_with_int8_token(setup, mode):
    name = "sel-" + mode[0].split("=")[0]
    result = _run(setup, name, "activations=int8-token", *mode)
    assert result.activations == "int8-token"
    _assert_trained_with(setup / name, "int8-token")


def test_kd_with_q8_0_the_teacher_runs_full_precision(setup, monkeypatch):
    from bitcpm_cli.core.training import trainer as trainer_module

    seen = []
    real = trainer_module._teacher_logits

    def record(teacher, inputs):
        seen.append((bool(qat_layers(teacher)), any(hasattr(m, "bitcpm_activations") for m in teacher.modules())))
        return real(teacher, inputs)

    monkeypatch.setattr(trainer_module, "_teacher_logits", record)
    result = _run(setup, "kd", "activations=q8_0", f"teacher={setup / 'float'}", "kd_loss=mse")
    assert result.activations == "q8_0" and seen and set(seen) == {(False, False)}  # the float teacher, unquantized
    _assert_trained_with(setup / "kd", "q8_0")


def test_sft_with_q8_0(setup):
    result = _run(setup, "sft", "activations=q8_0", "max_length=32", sft=True)
    assert result.activations == "q8_0"
    _assert_trained_with(setup / "sft", "q8_0")


def test_a_qat_checkpoint_continues_with_other_activations_with_a_note(setup):
    result = _run(setup, "continued", "activations=none", model="full-learned/final")
    assert result.activations == "none" and "activations" not in result.scheme
    assert any(n.startswith("activations none replace the checkpoint's q8_0") for n in result.notes)
    config = json.loads((setup / "continued" / "final" / "config.json").read_text())
    assert "activations" not in config["bitcpm_quant"] and config["bitcpm_quant"]["learned_scales"]


def test_resume_with_other_activations_is_refused_before_loading(setup):
    from bitcpm_cli.core.training.train import train

    output = setup / "full-learned"
    before = sorted(p.relative_to(output) for p in output.rglob("*"))
    config = resolve_config(TrainConfig, RECIPE, {"model": str(setup / "float"), "data": [str(setup / "count.txt")],
                                                  "output_dir": str(output)},
                            ["max_steps=4", "save_steps=2", "batch_size=2", "learned_scales=true",
                             "activations=int8-token", "resume=true"])
    with pytest.raises(ConfigError) as caught:
        train(config)
    assert "activations 'q8_0' (saved) vs 'int8-token' (now)" in caught.value.message
    assert sorted(p.relative_to(output) for p in output.rglob("*")) == before
