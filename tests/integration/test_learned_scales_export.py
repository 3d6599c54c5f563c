"""A QAT checkpoint trained with learned scales (`<module>.quant_alpha` beside each latent weight, bitcpm_quant's
`learned_scales: true`): every command that reads it takes the stored scales, exactly.

Fused = codes x learned scale, bit for bit (the fused model's float32 logits equal the QAT forward's); packed reads
back to exactly the fused weights; GGUF is exact (at tq2_0 / tq1_0 it holds the float16 fused weights, whose scales
are fp16 numbers) or refused by today's block rules; the QAT folder, its fused conversion and its GGUF give the same greedy
tokens; fix-config passes; a scale that is missing, of the wrong shape, or stored for a scheme without learned
scales, and convert flags that cannot use the stored scales, are exit 2 with one line, nothing written, the input
unchanged."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from bitcpm_cli.core.conversion.convert import convert_checkpoint
from tests.helpers import bitcpm_script, build_tiny_model

TOKENIZER = Path(__file__).resolve().parents[2] / "configs" / "quickstart" / "tokenizer"
IDS = torch.tensor([[1, 20, 31, 45, 8, 60, 71, 9, 15, 33]])
GROUP_SIZES = (-1, 0, 32)


def learned_checkpoint(root: Path, group_size: int, seed: int = 0, config: dict | None = None,
                       tokenizer: Path | None = None, head_gain: float = 1.0):
    """A tiny Llama prepared with learned scales, every scale moved off its absmean start by a random factor in
    [0.5, 1.5] (as training would), saved as a QAT checkpoint with a tokenizer; returns (folder, the model)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bitcpm_cli.core.quant import QuantScheme, learned_scale_params, prepare

    base = build_tiny_model(root / "float", kind="float", seed=seed, config=config, tokenizer=tokenizer)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    with torch.no_grad():  # logits with clear winners where two engines' rounding must not flip a greedy choice
        model.lm_head.weight.mul_(head_gain)
    prepare(model, QuantScheme(group_size=group_size, learned_scales=True))
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for layer in learned_scale_params(model).values():
            layer.quant_alpha.mul_(torch.rand(layer.quant_alpha.shape, generator=generator) + 0.5)
    model.save_pretrained(root / "qat")
    AutoTokenizer.from_pretrained(base).save_pretrained(root / "qat")
    shutil.rmtree(base)
    return root / "qat", model


def logits(model, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob("*.safetensors")):
        state.update(load_file(path))
    return state


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def one_error(run, start: str) -> str:
    lines = run.stderr.splitlines()
    assert run.returncode == 2, run.stderr
    assert lines and lines[0].startswith(f"error: {start}") and lines[-1].startswith("hint: "), run.stderr
    assert sum(line.startswith("error:") for line in lines) == 1 and "Traceback" not in run.stderr
    return run.stderr


@pytest.fixture(scope="module")
def learned(tmp_path_factory):
    """{group_size: (QAT folder, the QAT forward's float32 logits)} for per-row, per-tensor and 32-wide groups."""
    root = tmp_path_factory.mktemp("learned")
    models = {}
    for group_size in GROUP_SIZES:
        folder, model = learned_checkpoint(root / f"g{group_size}", group_size)
        models[group_size] = (folder, logits(model))
    return models


# ---- fused: codes x learned scale, bit for bit ----------------------------------------------------------------
@pytest.mark.parametrize("group_size", GROUP_SIZES)
def test_fused_output_is_the_qat_forward_bit_for_bit(learned, tmp_path, group_size):
    from transformers import AutoModelForCausalLM

    from bitcpm_cli.core.quant import SCALE_PARAM

    qat, expected = learned[group_size]
    result = convert_checkpoint(qat, tmp_path / "fused", dtype="float32", verify=True)
    assert result.verify.ok and result.tensors_quantized == 14
    assert any("learned scales: 14 linears" in note for note in result.notes)
    fused = AutoModelForCausalLM.from_pretrained(tmp_path / "fused", dtype=torch.float32).eval()
    assert torch.equal(logits(fused), expected)
    written = tensors(tmp_path / "fused")
    assert not any(name.endswith(SCALE_PARAM) for name in written)  # consumed, not written
    assert "bitcpm_quant" not in json.loads((tmp_path / "fused" / "config.json").read_text())
    # The fused weight is codes x the stored scale, computed here from the definition ...
    source = tensors(qat)
    name = "model.layers.1.mlp.down_proj"
    weight, alpha = source[name + ".weight"], source[name + "." + SCALE_PARAM]
    rows, groups = alpha.shape
    s = alpha.clamp_min(1e-5).unsqueeze(-1)
    codes = torch.clamp(torch.round(weight.reshape(rows, groups, -1) / s), -1, 1)
    assert torch.equal(written[name + ".weight"], (codes * s).reshape(weight.shape) + 0.0)
    # ... which absmean scales would not give: the learned scales were taken.
    absmean = weight.reshape(rows, groups, -1).abs().mean(-1, keepdim=True).clamp_min(1e-5)
    assert not torch.equal(s, absmean)


def test_qat_folder_reloads_with_its_learned_scales(learned):
    """The loader every command uses: transformers drops quant_alpha, load_learned_scales puts it back exactly."""
    from transformers import AutoModelForCausalLM

    from bitcpm_cli.core.model.learned_scales import load_learned_scales
    from bitcpm_cli.core.quant import QuantScheme, prepare

    qat, expected = learned[32]
    model = AutoModelForCausalLM.from_pretrained(qat, dtype=torch.float32).eval()
    prepare(model, QuantScheme.from_config(json.loads((qat / "config.json").read_text())))
    assert load_learned_scales(model, qat) == 14
    assert torch.equal(logits(model), expected)


# ---- packed: reads back to exactly the fused weights ------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_packed_reads_back_to_the_fused_weights(learned, tmp_path, dtype):
    from bitcpm_cli.core.formats.packed import unpacked_state_dict
    from bitcpm_cli.core.model.checkpoint import read_tensor_specs
    from bitcpm_cli.core.quant import SCALE_PARAM

    qat, _ = learned[32]
    convert_checkpoint(qat, tmp_path / "fused", dtype=dtype)
    result = convert_checkpoint(qat, tmp_path / "packed", fmt="packed", dtype=dtype, verify=True)
    assert result.verify.ok
    fused = tensors(tmp_path / "fused")
    files, specs = read_tensor_specs(tmp_path / "packed")
    unpacked = unpacked_state_dict(files, specs, getattr(torch, dtype))
    assert unpacked.keys() == fused.keys()
    assert all(torch.equal(unpacked[name], fused[name]) for name in fused)
    packed = tensors(tmp_path / "packed")
    assert not any(name.endswith(SCALE_PARAM) for name in packed)
    # The packed scale is the learned one (above the floor) in the output dtype: exactly the float32 scale there.
    name = "model.layers.0.self_attn.q_proj"
    stored = tensors(qat)[name + "." + SCALE_PARAM].clamp_min(1e-5)
    assert torch.equal(packed[name + ".weight_scale"], stored.to(getattr(torch, dtype)))
    config = json.loads((tmp_path / "packed" / "config.json").read_text())["bitcpm_quant"]
    assert config["packed"] is True and "learned_scales" not in config  # no quant_alpha tensors there
    # and unpacking it with convert gives the fused folder's bytes
    convert_checkpoint(tmp_path / "packed", tmp_path / "unpacked", dtype=dtype, verify=True)
    again = tensors(tmp_path / "unpacked")
    assert again.keys() == fused.keys() and all(torch.equal(again[n], fused[n]) for n in fused)


# ---- GGUF and the engines -------------------------------------------------------------------------------------
GGUF_SHAPE = {"vocab_size": 512, "hidden_size": 256, "intermediate_size": 512, "head_dim": 64}


@pytest.fixture(scope="module")
def gguf_ready(tmp_path_factory):
    """A learned-scales checkpoint whose rows are 256-multiples, with a SentencePiece-style tokenizer."""
    pytest.importorskip("gguf", reason="GGUF tests need the gguf extra: pip install -e '.[gguf]'")
    root = tmp_path_factory.mktemp("learned-gguf")
    # seed 2: no greedy choice of the prompts below is within llama.cpp's 8-bit activation noise (with seeds 0, 4
    # and 5 one of them is, which `bitcpm compare` reports as a near tie or a small-margin divergence)
    qat, _ = learned_checkpoint(root, -1, seed=2, config=GGUF_SHAPE, tokenizer=TOKENIZER, head_gain=20.0)
    convert_checkpoint(qat, root / "fused", dtype="bfloat16")
    convert_checkpoint(qat, root / "fused16", dtype="float16")  # what a GGUF file holds
    return root


def permute(w: torch.Tensor, heads: int) -> torch.Tensor:
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.mark.parametrize("gguf_type", ["tq2_0", "tq1_0"])
def test_gguf_is_exact_at_the_ternary_types(gguf_ready, tmp_path, gguf_type):
    """Learned scales are arbitrary float32, but GGUF encodes the float16 fused weights, whose scales (above the
    1e-5 floor) are fp16 numbers: every block decodes to the fused weights bit for bit."""
    import gguf
    import numpy as np

    from bitcpm_cli.core.conversion.gguf.export import export_gguf

    result = export_gguf(gguf_ready / "qat", tmp_path / "m.gguf", gguf_type=gguf_type)
    assert result.exact and result.max_abs_error == 0 and result.ternary_tensors == 14
    fused = {k: v.float().numpy() for k, v in tensors(gguf_ready / "fused16").items()}
    found = {t.name: t for t in gguf.GGUFReader(str(tmp_path / "m.gguf")).tensors}
    for gguf_name, name, heads in (("blk.0.attn_q.weight", "model.layers.0.self_attn.q_proj.weight", 4),
                                   ("blk.1.ffn_down.weight", "model.layers.1.mlp.down_proj.weight", None),
                                   ("blk.1.attn_v.weight", "model.layers.1.self_attn.v_proj.weight", None)):
        block = found[gguf_name]
        assert block.tensor_type.name == gguf_type.upper()
        values = gguf.quants.dequantize(np.asarray(block.data), block.tensor_type).reshape(fused[name].shape)
        want = fused[name] if heads is None else permute(torch.from_numpy(fused[name]), heads).numpy()
        assert np.array_equal(values, want)


def test_gguf_refuses_what_no_ternary_block_holds_exactly(tmp_path):
    """A group of 128 puts two scales in a 256-block: tq2_0 is refused (exit 1, nothing written) as for absmean
    scales; --gguf-type auto writes it exactly (Q4_0); --allow-lossy is llama.cpp's rounding, reported not exact."""
    pytest.importorskip("gguf", reason="GGUF tests need the gguf extra: pip install -e '.[gguf]'")
    from bitcpm_cli.core.conversion.gguf.export import export_gguf

    qat, _ = learned_checkpoint(tmp_path / "g128", 128, config=GGUF_SHAPE, tokenizer=TOKENIZER)
    before = digest(qat)
    run = bitcpm_script("convert", "-i", qat, "-o", tmp_path / "m.gguf", "--format", "gguf")
    assert run.returncode == 1 and "more than one scale in a block of 256" in run.stderr, run.stderr
    assert not (tmp_path / "m.gguf").exists() and digest(qat) == before
    auto = export_gguf(qat, tmp_path / "auto.gguf", gguf_type="auto")
    assert auto.exact and auto.tensor_types["Q4_0"] == 14
    lossy = export_gguf(qat, tmp_path / "lossy.gguf", allow_lossy=True)
    assert not lossy.exact and lossy.max_abs_error > 0


def _infer(model: Path, out: Path, *extra: str) -> list[list[int]]:
    run = bitcpm_script("infer", "-m", model, "--prompts", out.parent / "prompts.txt", "-o", out, "--device", "cpu",
                        "--max-new-tokens", "12", "-q", *extra)
    assert run.returncode == 0, run.stderr
    return [r["token_ids"] for r in json.loads(out.read_text())["results"]]


def test_converted_and_reloaded_gives_the_same_greedy_tokens_in_both_engines(gguf_ready, tmp_path):
    """hf on the QAT folder (fused on load with its learned scales) = hf on its fused conversion = llama.cpp on its
    GGUF (tq2_0, exact), greedy."""
    pytest.importorskip("llama_cpp", reason="llama.cpp tests need llama-cpp-python (the gguf extra)")
    (tmp_path / "prompts.txt").write_text("23 24 25 26\ncontinue: 47 48 49\nhello Zebra!\n")
    run = bitcpm_script("convert", "-i", gguf_ready / "qat", "-o", tmp_path / "m.gguf", "--format", "gguf")
    assert run.returncode == 0, run.stderr
    qat = _infer(gguf_ready / "qat", tmp_path / "qat.json")
    fused = _infer(gguf_ready / "fused", tmp_path / "fused.json")
    assert qat == fused and all(len(tokens) > 0 for tokens in qat)
    fused32 = _infer(gguf_ready / "fused", tmp_path / "fused32.json", "--dtype", "float32")
    llama = _infer(tmp_path / "m.gguf", tmp_path / "llama.json", "--engine", "llama.cpp")
    assert llama == fused32


def test_fix_config_accepts_the_learned_scales_checkpoint(learned):
    qat, _ = learned[32]
    run = bitcpm_script("fix-config", qat, "--json")
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    field = next(f for f in report["fields"] if f["field"] == "bitcpm_quant.learned_scales")
    assert report["consistent"] and field["verdict"] == "ok" and field["config"] is True and field["weights"] is True
    assert next(f for f in report["fields"] if f["field"] == "dtype")["verdict"] == "ok"


# ---- bad input: exit 2, one line, nothing written, input unchanged ----------------------------------------------
def _damaged(learned, tmp_path: Path, change) -> Path:
    """A copy of the group-32 checkpoint whose tensors (and config) `change` edits."""
    from safetensors.torch import save_file

    folder = tmp_path / "bad"
    shutil.copytree(learned[32][0], folder)
    state = tensors(folder)
    config = json.loads((folder / "config.json").read_text())
    change(state, config)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _refused_everywhere(folder: Path, tmp_path: Path, start: str, commands=("fused", "packed", "gguf", "infer")):
    """Each command is exit 2 with one `error:` line starting with `start`, writes nothing, changes nothing."""
    before, listing = digest(folder), sorted(os.listdir(tmp_path))
    for command in commands:
        if command == "infer":
            run = bitcpm_script("infer", "-m", folder, "-p", "Hello", "-o", tmp_path / "r.json", "--device", "cpu")
        else:
            out = tmp_path / ("m.gguf" if command == "gguf" else command)
            run = bitcpm_script("convert", "-i", folder, "-o", out, "--format", command)
        one_error(run, start)
        assert sorted(os.listdir(tmp_path)) == listing and digest(folder) == before


ALPHA = "model.layers.0.mlp.up_proj.quant_alpha"


def test_a_scale_of_the_wrong_shape_is_refused(learned, tmp_path):
    folder = _damaged(learned, tmp_path, lambda state, config: state.update({ALPHA: state[ALPHA][:, :1].clone()}))
    _refused_everywhere(folder, tmp_path, f"{ALPHA}: shape [128, 1] does not fit its weight [128, 64] at group_size "
                                          "32 (that needs [128, 2]); it fits group_size -1")
    run = bitcpm_script("fix-config", folder)
    assert run.returncode == 1 and ALPHA in run.stdout and "cannot fix" in run.stdout, run.stdout + run.stderr


def test_a_missing_scale_is_refused(learned, tmp_path):
    folder = _damaged(learned, tmp_path, lambda state, config: state.pop(ALPHA))
    _refused_everywhere(folder, tmp_path, f"{ALPHA}: missing (the scheme has learned_scales)")


def test_scales_in_a_checkpoint_whose_scheme_has_none_are_refused(learned, tmp_path):
    folder = _damaged(learned, tmp_path, lambda state, config: config["bitcpm_quant"].pop("learned_scales"))
    _refused_everywhere(folder, tmp_path, "model.layers.0.mlp.down_proj.quant_alpha: the checkpoint holds 14 learned "
                                          "scale tensor(s) (quant_alpha) but its quantization scheme has no "
                                          "learned_scales")
    run = bitcpm_script("fix-config", folder, "--json")
    assert run.returncode == 1 and json.loads(run.stdout)["unfixable"] == ["bitcpm_quant.learned_scales"]


def test_a_float_checkpoint_with_scales_is_refused_even_with_a_scheme_on_the_command_line(learned, tmp_path):
    folder = _damaged(learned, tmp_path, lambda state, config: config.pop("bitcpm_quant"))
    before = digest(folder)
    run = bitcpm_script("convert", "-i", folder, "-o", tmp_path / "out", "--quant-type", "ternary", "--group-size", 32)
    one_error(run, "model.layers.0.mlp.down_proj.quant_alpha: the checkpoint holds 14 learned scale tensor(s)")
    assert not (tmp_path / "out").exists() and digest(folder) == before
    _refused_everywhere(folder, tmp_path, "model.layers.0.mlp.down_proj.quant_alpha", commands=("infer",))


@pytest.mark.parametrize("flags, start", [
    (("--group-size", "0"), "--group-size 0 cannot use the checkpoint's learned scales (quant_alpha), which hold one "
                            "scale per group of group_size 32"),
    (("--quant-type", "int4"), "--quant-type int4 cannot use the checkpoint's learned scales"),
])
def test_convert_flags_that_cannot_use_the_stored_scales_are_refused(learned, tmp_path, flags, start):
    qat = learned[32][0]
    before = digest(qat)
    stderr = one_error(bitcpm_script("convert", "-i", qat, "-o", tmp_path / "out", *flags), start)
    assert "omit --" in stderr
    assert not (tmp_path / "out").exists() and digest(qat) == before
    same = bitcpm_script("convert", "-i", qat, "-o", tmp_path / "same", "--group-size", "32")
    assert same.returncode == 0, same.stderr  # the trained group size is what works
