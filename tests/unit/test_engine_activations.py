"""The transformers engine runs a model's activation scheme (issue #25): a QAT checkpoint's bitcpm_quant, a fused
folder's bitcpm_activations record, a packed folder's scheme, or an --activations override; every refusal comes
before any weight is read."""

import json
import shutil

import pytest
import torch

from bitcpm_cli.core.conversion.convert import convert_checkpoint
from bitcpm_cli.core.engines.hf import HFEngine, load_for_inference
from bitcpm_cli.core.errors import ConfigError, InputError, QuantError
from tests.helpers import build_char_tokenizer, build_tiny_model

IDS = [1, 10, 20, 30, 40, 50, 11, 12]


def a8_qat_model(folder, activations="q8_k", layers=1):
    """A tiny QAT checkpoint whose linears take 256-multiple inputs (q8_k blocks fit), with `activations`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from bitcpm_cli.core.quant import QuantScheme, prepare

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=256, intermediate_size=512,
                                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                         head_dim=64, max_position_embeddings=128, bos_token_id=1, eos_token_id=2,
                                         pad_token_id=3))
    prepare(model, QuantScheme(group_size=-1, activations=activations))
    model.save_pretrained(folder)
    build_char_tokenizer(folder)
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("a8")
    a8_qat_model(root / "qat")
    convert_checkpoint(root / "qat", root / "fused", dtype="float32")
    convert_checkpoint(root / "qat", root / "packed", fmt="packed", dtype="float32")
    return root


def scored(path, **options):
    """The logits `eval` scores with (the hf engine's session, the QAT forward for a QAT checkpoint)."""
    session = HFEngine().open(path, device="cpu", dtype="float32", qat_forward=True, **options)
    try:
        return session.score(IDS), session.info, session.notes
    finally:
        session.close()


def direct_forward(path, activations):
    """The QAT forward written out in the test: each quantized linear computes
    linear(dequantized input, fake-quantized weight, bias) from the float checkpoint's own weights."""
    from transformers import AutoModelForCausalLM

    from bitcpm_cli.core.quant import LayerQuant, fake_quantize
    from bitcpm_cli.core.quant.activations import dequantized

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name != "lm_head":
            weight = fake_quantize(module.weight.detach(), LayerQuant("ternary", -1))

            def forward(x, weight=weight, bias=module.bias):
                x = dequantized(x, activations).to(x.dtype) if activations != "none" else x
                return torch.nn.functional.linear(x, weight, bias)

            module.forward = forward
    with torch.no_grad():
        return model(input_ids=torch.tensor([IDS])).logits[0]


def test_a_qat_checkpoint_scores_with_its_recorded_scheme(models):
    logits, info, notes = scored(models / "qat")
    assert info["activations"] == "q8_k" and info["format"] == "qat"
    assert "activations: q8_k on 7 linears (recorded in config.json's bitcpm_quant)" in notes
    assert torch.equal(logits, direct_forward(models / "qat", "q8_k"))
    plain, info, notes = scored(models / "qat", activations="none")
    assert info["activations"] == "none" and "activations: none on every linear (--activations none)" in notes
    assert not torch.equal(plain, logits)
    assert torch.equal(plain, direct_forward(models / "qat", "none"))


def test_fused_on_load_and_the_fake_quantizer_run_the_same_scheme(models):
    kept = load_for_inference(models / "qat", device="cpu", dtype="float32", fuse_qat=False)
    fused = load_for_inference(models / "qat", device="cpu", dtype="float32", fuse_qat=True)
    ids = torch.tensor([IDS])
    with torch.no_grad():
        assert torch.equal(kept.model(input_ids=ids).logits, fused.model(input_ids=ids).logits)
    assert kept.info["activations"] == fused.info["activations"] == "q8_k"
    override = load_for_inference(models / "qat", device="cpu", dtype="float32", fuse_qat=True,
                                  activations="int8-token")
    assert override.info["activations"] == "int8-token"
    assert {m.bitcpm_activations for n, m in override.model.named_modules() if hasattr(m, "bitcpm_activations")} \
        == {"int8-token"}


@pytest.mark.parametrize("folder", ["fused", "packed"])
def test_fused_and_packed_folders_run_the_qat_a8_forward(models, folder):
    reference, _, _ = scored(models / "qat")
    logits, info, notes = scored(models / folder)
    assert info["activations"] == "q8_k" and torch.equal(logits, reference)
    key = "bitcpm_activations" if folder == "fused" else "bitcpm_quant"
    assert f"activations: q8_k on 7 linears (recorded in config.json's {key})" in notes
    plain, info, _ = scored(models / folder, activations="none")
    assert info["activations"] == "none" and torch.equal(plain, scored(models / "qat", activations="none")[0])
    other, info, notes = scored(models / folder, activations="q8_0")
    assert info["activations"] == "q8_0" and "activations: q8_0 on 7 linears (--activations q8_0)" in notes
    assert torch.equal(other, scored(models / "qat", activations="q8_0")[0])


def no_weights_read(monkeypatch):
    """Make loading any weights fail loudly: a refusal must come before."""
    import transformers

    def never(*args, **kwargs):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", never)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_config", never)


def test_a_broken_fused_record_is_refused_before_any_weight_is_read(models, tmp_path, monkeypatch):
    broken = tmp_path / "broken"
    shutil.copytree(models / "fused", broken)
    config = json.loads((broken / "config.json").read_text())
    config["bitcpm_activations"] = {"q8_k": ["model.layers.0.mlp.nope"], "q4": ["model.layers.0.mlp.up_proj"]}
    (broken / "config.json").write_text(json.dumps(config))
    no_weights_read(monkeypatch)
    with pytest.raises(ConfigError) as caught:
        load_for_inference(broken, device="cpu")
    assert "invalid bitcpm_activations" in caught.value.message
    assert any("model.layers.0.mlp.nope" in p for p in caught.value.problems)
    assert any("'q4' is not one of" in p for p in caught.value.problems)
    with pytest.raises(ConfigError):
        HFEngine().check_activations(broken, None)


def test_an_override_whose_block_does_not_divide_a_layer_is_refused_before_loading(tmp_path, monkeypatch):
    build_tiny_model(tmp_path / "qat", kind="qat")  # in_features 64 and 128: q8_k's 256 does not divide them
    build_tiny_model(tmp_path / "fused", kind="fused")
    no_weights_read(monkeypatch)
    for folder in ("qat", "fused"):
        with pytest.raises(QuantError) as caught:
            load_for_inference(tmp_path / folder, device="cpu", activations="q8_k")
        assert caught.value.message.startswith("--activations q8_k does not fit")
        assert any(p.startswith("model.layers.0.mlp.down_proj: activations q8_k quantize blocks of 256")
                   for p in caught.value.problems)
    with pytest.raises(InputError, match="--activations 'q8k' is not one of none, int8-token, q8_k, q8_0"):
        load_for_inference(tmp_path / "qat", device="cpu", activations="q8k")


def test_an_override_on_a_fused_folder_without_a_record_quantizes_its_fused_linears(tmp_path):
    build_tiny_model(tmp_path / "fused", kind="fused")
    build_tiny_model(tmp_path / "float", kind="float")
    assert "bitcpm_activations" not in json.loads((tmp_path / "fused" / "config.json").read_text())
    plain = load_for_inference(tmp_path / "fused", device="cpu", dtype="float32")
    assert plain.info["activations"] == "none" and not any("activations" in n for n in plain.notes)
    loaded = load_for_inference(tmp_path / "fused", device="cpu", dtype="float32", activations="int8-token")
    assert loaded.info["activations"] == "int8-token"
    assert "activations: int8-token on 14 linears (--activations int8-token, on the linears whose weights are " \
           "fused)" in loaded.notes
    assert loaded.model.lm_head._forward_pre_hooks == {}
    floating = load_for_inference(tmp_path / "float", device="cpu", dtype="float32", activations="int8-token")
    assert floating.info["activations"] == "none"
    assert any("--activations int8-token applies to quantized linears; a float model" in n for n in floating.notes)


def test_results_files_carry_the_activation_scheme_and_older_ones_still_load(tmp_path):
    from bitcpm_cli.core.evaluation.compare import compare_results
    from bitcpm_cli.core.formats.results import read_results, results_document

    result = {"id": 0, "prompt": "a", "token_ids": [5], "text": "x", "num_tokens": 1}
    paths = {}
    for name, activations in (("a8", "q8_k"), ("a16", "none"), ("old", None)):
        model = {"path": "m", "dtype": "float32", "format": "qat"}
        if activations is not None:
            model["activations"] = activations
        paths[name] = tmp_path / f"{name}.json"
        paths[name].write_text(json.dumps(results_document(model, {}, {}, [result], 1.0, [])))
        assert read_results(paths[name])[0]["model"].get("activations") == activations
    assert "activation schemes differ: q8_k in A, none in B" in compare_results(paths["a8"], paths["a16"]).notes
    assert not any("activation" in n for n in compare_results(paths["a8"], paths["old"]).notes)
    bad = json.loads(paths["a8"].read_text())
    bad["model"]["activations"] = 8
    paths["a8"].write_text(json.dumps(bad))
    with pytest.raises(InputError, match="model.activations: must be a string"):
        read_results(paths["a8"])
