"""Inference outputs: KV cache on, the input's generation settings kept, no training-only files."""

import json

import pytest
import torch

from bitcpm_cli.core.conversion.convert import convert_checkpoint
from bitcpm_cli.core.model.inference_ready import make_inference_ready

from tests.helpers import build_tiny_model


def generates_with_cache(folder):
    """Stock transformers: generate() uses a KV cache by default and agrees with the uncached run."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert model.config.use_cache is True and model.generation_config.use_cache is not False
    prompt = torch.tensor([[1, 10, 20, 30]])
    cached = model.generate(prompt, max_new_tokens=6, do_sample=False, return_dict_in_generate=True,
                            pad_token_id=3)
    assert cached.past_key_values is not None  # the cache was used
    plain = model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=False, pad_token_id=3)
    assert torch.equal(cached.sequences, plain)


@pytest.mark.parametrize("fmt", ["fused", "packed"])
def test_convert_of_a_training_checkpoint_is_inference_ready(tmp_path, fmt):
    source = build_tiny_model(tmp_path / "ckpt", kind="qat")
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, "use_cache": False}))
    (source / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2,
                                                               "repetition_penalty": 1.1, "use_cache": False}))
    (source / "trainer_state.json").write_text("{}")
    (source / "bitcpm_complete").write_text("{}")
    before = {p.name: p.read_bytes() for p in source.iterdir()}
    result = convert_checkpoint(source, tmp_path / "out", fmt=fmt, dtype="float32")
    out = tmp_path / "out"
    assert json.loads((out / "config.json").read_text())["use_cache"] is True
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["use_cache"] is True and generation["repetition_penalty"] == 1.1
    assert not (out / "trainer_state.json").exists() and not (out / "bitcpm_complete").exists()
    assert any("use_cache false -> true" in n for n in result.notes)
    assert {p.name: p.read_bytes() for p in source.iterdir()} == before  # the input is untouched
    if fmt == "fused":
        generates_with_cache(out)


def test_helper_restores_the_source_generation_settings(tmp_path):
    source, folder = tmp_path / "src", tmp_path / "final"
    source.mkdir()
    folder.mkdir()
    (source / "generation_config.json").write_text(json.dumps({"temperature": 0.7, "do_sample": True,
                                                               "eos_token_id": 2}))
    (folder / "config.json").write_text(json.dumps({"use_cache": False, "gradient_checkpointing": True}))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 5]}))
    (folder / "rng_state_0.pth").write_text("x")
    notes = make_inference_ready(folder, source)
    assert json.loads((folder / "config.json").read_text()) == {"use_cache": True}
    assert json.loads((folder / "generation_config.json").read_text()) == {
        "eos_token_id": [2, 5], "temperature": 0.7, "do_sample": True}  # the output's own eos ids win
    assert not (folder / "rng_state_0.pth").exists() and len(notes) == 2


@pytest.mark.parametrize("text", ['{"eos_token_id": 2,', "[1, 2]", '{"a": ' * 100 + "1" + "}" * 100])
def test_a_broken_generation_config_is_exit_2_and_nothing_is_written(tmp_path, text):
    from bitcpm_cli.core.errors import BitcpmError, CheckFailed

    source = build_tiny_model(tmp_path / "ckpt", kind="qat")
    (source / "generation_config.json").write_text(text)
    with pytest.raises(BitcpmError, match="generation_config.json") as info:
        convert_checkpoint(source, tmp_path / "out", fmt="fused", dtype="float32")
    assert not isinstance(info.value, CheckFailed)  # exit 2, not 1 (and not an internal error, exit 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
