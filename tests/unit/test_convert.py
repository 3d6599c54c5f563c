import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from bitcpm_cli.core.conversion import convert as convert_module
from bitcpm_cli.core.conversion import plan as plan_module
from bitcpm_cli.core.conversion import verify as verify_module
from bitcpm_cli.core.conversion import write as write_module
from bitcpm_cli.core.conversion.convert import convert_checkpoint
from bitcpm_cli.core.errors import ConfigError, InputError, QuantError
from bitcpm_cli.core.quant import LayerQuant, QuantScheme, fake_quantize, plan, plan_state_dict, prepare
from tests.conftest import tiny_llama_config
from tests.helpers import refuse_direct_io_at_open

IDS = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6, 5, 3]])
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def make_qat(path, group_size=128, quant_type="ternary", dtype=torch.float32, seed=0):
    """A QAT checkpoint folder (latent weights + bitcpm_quant) with in_features that 128 divides."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(hidden_size=128, intermediate_size=256, head_dim=32)).to(dtype)
    prepare(model, QuantScheme(quant_type=quant_type, group_size=group_size))
    model.save_pretrained(path)
    (path / "tokenizer_config.json").write_text('{"model_max_length": 128}')
    return model


def reference_fused(w: torch.Tensor, quant_type: str, group_size: int):
    """Independent reference: a plain loop over groups in float64. Returns (codes, scales, w / scale)."""
    w64 = w.to(torch.float64)
    rows = [w64.reshape(-1)] if group_size == 0 else list(w64)
    codes, scales, ratios = [], [], []
    for row in rows:
        size = row.numel() if group_size in (0, -1) else group_size
        for start in range(0, row.numel(), size):
            g = row[start:start + size]
            if quant_type == "ternary":
                s = max(float(g.abs().mean()), 1e-5)
                q = [max(-1.0, min(1.0, round(float(x) / s))) for x in g]
            elif quant_type == "binary":
                s = float(g.abs().mean())
                q = [1.0 if float(x) >= 0 else -1.0 for x in g]
            else:
                s = float(g.abs().max()) / 7
                q = [max(-8.0, min(7.0, round(float(x) / s))) for x in g]
            codes.append(torch.tensor(q, dtype=torch.float64))
            scales.append(torch.full((len(q),), s, dtype=torch.float64))
            ratios.append(g / s)
    shape = w.shape
    return torch.cat(codes).reshape(shape), torch.cat(scales).reshape(shape), torch.cat(ratios).reshape(shape)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("group_size", [-1, 0, 128])
@pytest.mark.parametrize("quant_type", ["ternary", "binary", "int4"])
def test_fusion_matches_independent_reference(tmp_path, quant_type, group_size, dtype):
    make_qat(tmp_path / "qat", group_size, quant_type, dtype)
    latent = load_file(tmp_path / "qat" / "model.safetensors")
    out_dtype = "float32" if dtype == torch.float32 else "bfloat16"
    result = convert_checkpoint(tmp_path / "qat", tmp_path / "fused", dtype=out_dtype)
    assert result.tensors_quantized == 2 * len(LINEARS)
    fused = load_file(tmp_path / "fused" / "model.safetensors")
    for name, w in latent.items():
        if any(f"{linear}.weight" in name for linear in LINEARS):
            codes, scales, ratios = reference_fused(w, quant_type, group_size)
            got = fused[name].to(torch.float64)
            got_codes = torch.round(got / scales)
            # Codes agree except where w / s sits on a rounding tie that float32 and float64 resolve differently.
            differ = got_codes != codes
            assert torch.all((ratios[differ].abs().frac() - 0.5).abs() < 1e-3), name
            # Scales agree up to float32 rounding of the mean (and one bf16 rounding of the product).
            same = ~differ & (codes != 0)
            relative = got[same] / (codes[same] * scales[same])
            tolerance = 1e-6 if dtype == torch.float32 else 2 ** -8
            assert torch.allclose(relative, torch.ones_like(relative), rtol=tolerance, atol=0), name
            # and bit-exact against the one definition every command shares
            assert torch.equal(fused[name], fake_quantize(w, LayerQuant(quant_type, group_size), dtype=fused[name].dtype))
        else:
            assert torch.equal(fused[name], w.to(fused[name].dtype)), name


@pytest.mark.parametrize("blocks", [False, True], ids=["one-pass", "row-blocks"])
def test_stock_transformers_loads_fused_output_with_qat_logits(tmp_path, monkeypatch, blocks):
    from transformers import AutoModelForCausalLM

    from bitcpm_cli.core.quant import functional

    qat = make_qat(tmp_path / "qat").eval()
    with torch.no_grad():
        expected = qat(IDS).logits  # the QAT forward quantizes each weight in one pass
    if blocks:  # convert quantizes in blocks of 16 rows, as it does for weights of real size
        monkeypatch.setattr(functional, "BLOCK_ELEMENTS", 16)
    convert_checkpoint(tmp_path / "qat", tmp_path / "fused", dtype="float32")
    config = json.loads((tmp_path / "fused" / "config.json").read_text())
    assert "bitcpm_quant" not in config and config.get("torch_dtype", config.get("dtype")) == "float32"
    assert (tmp_path / "fused" / "tokenizer_config.json").is_file()
    provenance = json.loads((tmp_path / "fused" / "bitcpm_convert.json").read_text())
    assert provenance["input"]["fingerprint"].startswith("sha256:") and provenance["scheme"]["group_size"] == 128
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "fused").eval()
    assert type(stock.model.layers[0].mlp.up_proj) is torch.nn.Linear
    with torch.no_grad():
        assert torch.equal(stock(IDS).logits, expected)


def test_fingerprint_is_the_sha256_of_the_weights(tmp_path):
    import hashlib

    make_qat(tmp_path / "qat")
    result = convert_checkpoint(tmp_path / "qat", tmp_path / "fused")
    digest = hashlib.sha256((tmp_path / "qat" / "model.safetensors").read_bytes()).hexdigest()
    assert result.fingerprint == f"sha256:{digest}"


def test_bin_to_bin_like_the_seed_script(tmp_path):
    model = make_qat(tmp_path / "qat", group_size=-1)
    torch.save(model.state_dict(), tmp_path / "ckpt.bin")
    result = convert_checkpoint(tmp_path / "ckpt.bin", tmp_path / "fused.bin", quant_type="ternary", group_size=-1)
    assert result.input_kind == "float" and result.dtype == "bfloat16"
    fused = torch.load(tmp_path / "fused.bin", weights_only=True)
    w = model.state_dict()["model.layers.1.mlp.down_proj.weight"]
    assert torch.equal(fused["model.layers.1.mlp.down_proj.weight"],
                       fake_quantize(w, LayerQuant("ternary", -1), dtype=torch.bfloat16))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.bin", "fused.bin", "qat"]


def test_fused_input_is_copied_not_rescaled(tmp_path):
    make_qat(tmp_path / "qat")
    convert_checkpoint(tmp_path / "qat", tmp_path / "fused")
    # Flags asking for absmean fusion again must not rescale the already fused groups.
    again = convert_checkpoint(tmp_path / "fused", tmp_path / "fused2", quant_type="ternary", group_size=-1)
    assert again.input_kind == "fused" and "already fused" in again.notes[0]
    first, second = load_file(tmp_path / "fused" / "model.safetensors"), load_file(tmp_path / "fused2" / "model.safetensors")
    assert all(torch.equal(first[n], second[n]) for n in first)
    name = "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(fake_quantize(first[name], LayerQuant("ternary", -1)), first[name])  # what was avoided


def test_packed_round_trip_is_exact_and_small(tmp_path):
    for group_size in (-1, 128):
        root = tmp_path / f"g{group_size}"
        root.mkdir()
        make_qat(root / "qat", group_size=group_size)
        convert_checkpoint(root / "qat", root / "fused")
        packed = convert_checkpoint(root / "qat", root / "packed", fmt="packed", verify=True)
        assert packed.verify.ok
        assert packed.linear_ratio_vs_bf16 >= 7.0
        config = json.loads((root / "packed" / "config.json").read_text())
        assert config["bitcpm_quant"]["packed"] is True and config["bitcpm_quant"]["group_size"] == group_size
        tensors = load_file(root / "packed" / "model.safetensors")
        assert tensors["model.layers.0.mlp.down_proj.weight_packed"].dtype == torch.uint8
        assert tensors["model.layers.0.mlp.down_proj.weight_scale"].dtype == torch.bfloat16
        unpacked = convert_checkpoint(root / "packed", root / "unpacked", verify=True)
        assert unpacked.input_kind == "packed"
        a, b = load_file(root / "fused" / "model.safetensors"), load_file(root / "unpacked" / "model.safetensors")
        assert a.keys() == b.keys() and all(same_bytes(a[n], b[n]) for n in a)


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.numpy().tobytes() == b.numpy().tobytes() \
        if a.dtype != torch.bfloat16 else same_bytes(a.view(torch.int16), b.view(torch.int16))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_packed_to_fused_is_qat_to_fused_byte_for_byte(tmp_path, dtype):
    """Including the sign of zero: a negative latent weight that rounds to code 0 is +0.0, as unpacking gives."""
    make_qat(tmp_path / "qat", group_size=-1)
    convert_checkpoint(tmp_path / "qat", tmp_path / "fused", dtype=dtype)
    convert_checkpoint(tmp_path / "qat", tmp_path / "packed", fmt="packed", dtype=dtype)  # scales in `dtype`
    convert_checkpoint(tmp_path / "packed", tmp_path / "unpacked", dtype=dtype, verify=True)
    a, b = load_file(tmp_path / "fused" / "model.safetensors"), load_file(tmp_path / "unpacked" / "model.safetensors")
    assert a.keys() == b.keys() and all(same_bytes(a[n], b[n]) for n in a)
    down = a["model.layers.0.mlp.down_proj.weight"]
    zeros = down == 0
    assert zeros.any() and not torch.signbit(down[zeros]).any()


def test_verify_compares_bytes_so_a_negative_zero_is_a_mismatch(tmp_path, monkeypatch):
    import threading

    make_qat(tmp_path / "qat", group_size=-1)
    real = plan_module.fake_quantize

    def converting_with_negative_zeros(*args, **kwargs):  # the old behaviour: -0.0 where a weight rounds to code 0
        fused = real(*args, **kwargs)
        if threading.current_thread().name.startswith("bitcpm-verify"):
            return fused  # the check recomputes +0.0
        return torch.where(fused == 0, -0.0 * torch.sign(args[0]).to(fused.dtype), fused)

    monkeypatch.setattr(plan_module, "fake_quantize", converting_with_negative_zeros)  # the conversion
    monkeypatch.setattr(verify_module, "fake_quantize", converting_with_negative_zeros)  # and the check's reference
    with pytest.raises(convert_module.CheckFailed, match="verification failed: 14 tensor"):
        convert_checkpoint(tmp_path / "qat", tmp_path / "fused", verify=True)
    assert not (tmp_path / "fused").exists()


def _corrupt_while_converting(monkeypatch, target: str, change):
    real = plan_module.Transform.apply

    def apply(self, name, tensor):
        return [(n, change(t) if n == target else t) for n, t in real(self, name, tensor)]

    monkeypatch.setattr(plan_module.Transform, "apply", apply)


def test_verify_finds_a_changed_copied_tensor_reading_it_back_a_slice_at_a_time(tmp_path, monkeypatch):
    make_qat(tmp_path / "qat")
    embedding = "model.embed_tokens.weight"
    _corrupt_while_converting(monkeypatch, embedding, lambda t: t.clone().index_fill_(0, torch.tensor([7]), 1.0))
    sliced, reread = [], []
    real_slices, real_reread = verify_module.ReadBack._slices, verify_module.ReadBack.reread

    def slices(self, name):
        for part in real_slices(self, name):
            sliced.append(part.numel())
            yield part

    monkeypatch.setattr(verify_module.ReadBack, "_slices", slices)
    monkeypatch.setattr(verify_module.ReadBack, "reread", lambda self, name: reread.append(name) or
                        real_reread(self, name))
    monkeypatch.setattr(verify_module.ReadBack, "SLICE", 1000)  # many slices: the changed row is in one of them
    with pytest.raises(convert_module.CheckFailed, match="first: model.embed_tokens.weight"):  # float32 in and out:
        convert_checkpoint(tmp_path / "qat", tmp_path / "fused", dtype="float32", verify=True)  # copied unchanged
    embedding_bytes = load_file(tmp_path / "qat" / "model.safetensors")[embedding].nbytes
    assert max(sliced) == 1000 and sum(sliced) > embedding_bytes  # compared as it was read, a slice at a time
    assert reread == []  # a tensor written unchanged is compared with the input file, slice by slice: never whole
    assert not (tmp_path / "fused").exists()


def test_verify_reads_the_input_once_and_passes_an_unchanged_copy_compared_in_slices(tmp_path, monkeypatch):
    make_qat(tmp_path / "qat")
    streams, real_prefetched = [], convert_module.prefetched

    def prefetched(items, **kwargs):
        streams.append(items.__name__)
        return real_prefetched(items, **kwargs)

    held, real_check = {}, verify_module.Checker.check

    def check(self, name, tensor):
        held[name] = tensor is not None
        return real_check(self, name, tensor)

    monkeypatch.setattr(convert_module, "prefetched", prefetched)  # the input, read for the conversion
    monkeypatch.setattr(verify_module, "prefetched", prefetched)  # the output, read back
    monkeypatch.setattr(verify_module.Checker, "check", check)
    monkeypatch.setattr(verify_module.ReadBack, "SLICE", 1000)
    result = convert_checkpoint(tmp_path / "qat", tmp_path / "fused", dtype="float32", verify=True)
    assert result.verify.ok and result.verify.tensors_checked == 21
    quantized = {name for name in held if name.endswith(tuple(f"{linear}.weight" for linear in LINEARS))}
    assert len(quantized) == 2 * len(LINEARS) and all(held[name] for name in quantized)
    assert not any(held[name] for name in set(held) - quantized)  # embeddings and norms: compared with the file
    # One stream of the input, read (and hashed) for the conversion: the check works on the tensors it gives (those
    # written unchanged, not held meanwhile, are compared with the input file). The output is read back as it
    # reaches the disk.
    assert streams == ["iter_tensors", "_read"]


def test_non_finite_latent_weights_are_refused_naming_the_layer(tmp_path):
    make_qat(tmp_path / "qat")
    weights = load_file(tmp_path / "qat" / "model.safetensors")
    weights["model.layers.0.mlp.up_proj.weight"][3, 5] = float("nan")
    save_file(weights, tmp_path / "qat" / "model.safetensors", metadata={"format": "pt"})
    before = (tmp_path / "qat" / "model.safetensors").read_bytes()
    with pytest.raises(QuantError, match="model.layers.0.mlp.up_proj: the weight holds NaN"):
        convert_checkpoint(tmp_path / "qat", tmp_path / "fused", verify=True)
    assert not (tmp_path / "fused").exists()
    assert (tmp_path / "qat" / "model.safetensors").read_bytes() == before


def test_verify_finds_a_written_weight_that_is_not_ternary(tmp_path, monkeypatch):
    make_qat(tmp_path / "qat")
    name = "model.layers.1.mlp.up_proj.weight"
    _corrupt_while_converting(monkeypatch, name, lambda t: t + (1e-3 * torch.arange(t.numel()).reshape(t.shape)).to(t.dtype))
    report = {}
    real_finish = verify_module.Verifier.finish
    monkeypatch.setattr(verify_module.Verifier, "finish",
                        lambda self, staging: report.setdefault("verify", real_finish(self, staging)))
    with pytest.raises(convert_module.CheckFailed, match="verification failed"):
        convert_checkpoint(tmp_path / "qat", tmp_path / "fused", verify=True)
    assert report["verify"].mismatches == report["verify"].not_ternary == [name]
    assert report["verify"].tensors_checked == 21


def test_fused_input_packs_exactly(tmp_path):
    make_qat(tmp_path / "qat")
    convert_checkpoint(tmp_path / "qat", tmp_path / "fused")
    convert_checkpoint(tmp_path / "fused", tmp_path / "packed", fmt="packed", group_size=128)
    convert_checkpoint(tmp_path / "packed", tmp_path / "unpacked")
    a, b = load_file(tmp_path / "fused" / "model.safetensors"), load_file(tmp_path / "unpacked" / "model.safetensors")
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_verify_reports_zero_fraction_per_layer(tmp_path):
    make_qat(tmp_path / "qat")
    result = convert_checkpoint(tmp_path / "qat", tmp_path / "fused", verify=True)
    assert result.verify.ok and result.verify.tensors_checked == 21
    per_layer = result.verify.per_layer()
    assert list(per_layer) == ["0", "1"]
    assert all(0.2 < f < 0.45 for f in per_layer.values())  # absmean ternary of Gaussian weights: ~31 % zeros


def test_sharded_output_and_input(tmp_path):
    from transformers import AutoModelForCausalLM

    make_qat(tmp_path / "qat")
    result = convert_checkpoint(tmp_path / "qat", tmp_path / "fused", max_shard_bytes=100_000, dtype="float32")
    assert result.shards > 2
    index = json.loads((tmp_path / "fused" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == result.shards
    AutoModelForCausalLM.from_pretrained(tmp_path / "fused")
    again = convert_checkpoint(tmp_path / "fused", tmp_path / "single.safetensors")  # sharded fused input
    assert again.input_kind == "fused" and (tmp_path / "single.safetensors").is_file()


def test_group_size_override_is_a_loud_warning(tmp_path):
    make_qat(tmp_path / "qat", group_size=128)
    result = convert_checkpoint(tmp_path / "qat", tmp_path / "fused", group_size=-1)
    assert any("trained with (128)" in w and "NOT match" in w for w in result.warnings)
    assert result.scheme["group_size"] == -1


def test_float_model_needs_a_scheme(tmp_path):
    from transformers import LlamaForCausalLM

    LlamaForCausalLM(tiny_llama_config()).save_pretrained(tmp_path / "float")
    with pytest.raises(ConfigError, match="no quantization scheme"):
        convert_checkpoint(tmp_path / "float", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert convert_checkpoint(tmp_path / "float", tmp_path / "out", quant_type="ternary").scheme["group_size"] == -1


def test_mixed_fused_and_latent_input_is_refused(tmp_path):
    make_qat(tmp_path / "qat")
    convert_checkpoint(tmp_path / "qat", tmp_path / "fused", dtype="float32")
    tensors = load_file(tmp_path / "fused" / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"] = torch.randn(256, 128)
    save_file(tensors, tmp_path / "fused" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(InputError, match="mixes fused and latent"):
        convert_checkpoint(tmp_path / "fused", tmp_path / "out")
    assert [p.name for p in tmp_path.iterdir() if p.name != "qat" and p.name != "fused"] == []


def test_failure_midway_leaves_nothing(tmp_path, monkeypatch):
    make_qat(tmp_path / "qat")

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(plan_module, "fake_quantize", boom)
    with pytest.raises(RuntimeError):
        convert_checkpoint(tmp_path / "qat", tmp_path / "fused")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["qat"]


def test_malicious_pickle_is_refused_and_not_executed(tmp_path, monkeypatch):
    class Exploit:
        def __reduce__(self):
            import os

            return (os.system, ("touch pwned",))

    monkeypatch.chdir(tmp_path)
    torch.save({"model.layers.0.mlp.up_proj.weight": torch.zeros(4, 4), "x": Exploit()}, tmp_path / "evil.bin")
    with pytest.raises(InputError, match="refusing to load"):
        convert_checkpoint(tmp_path / "evil.bin", tmp_path / "out.bin", quant_type="ternary")
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "out.bin").exists()


def test_truncated_input(tmp_path):
    make_qat(tmp_path / "qat")
    weights = tmp_path / "qat" / "model.safetensors"
    with weights.open("r+b") as handle:
        handle.truncate(weights.stat().st_size // 2)
    with pytest.raises(InputError, match="truncated"):
        convert_checkpoint(tmp_path / "qat", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_output_equal_to_or_inside_input_refused(tmp_path):
    make_qat(tmp_path / "qat")
    for output, message in ((tmp_path / "qat", "is the input"), (tmp_path / "qat" / "sub", "inside the input"),
                            (tmp_path, "input is inside")):
        with pytest.raises(InputError, match=message):
            convert_checkpoint(tmp_path / "qat", output)


def test_existing_output_needs_overwrite(tmp_path):
    make_qat(tmp_path / "qat")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("old")
    with pytest.raises(InputError, match="already exists"):
        convert_checkpoint(tmp_path / "qat", tmp_path / "out")
    convert_checkpoint(tmp_path / "qat", tmp_path / "out", overwrite=True)
    assert not (tmp_path / "out" / "old.txt").exists() and (tmp_path / "out" / "model.safetensors").is_file()


def test_config_mismatch_stops_with_fix_config_hint(tmp_path):
    make_qat(tmp_path / "qat")
    config = json.loads((tmp_path / "qat" / "config.json").read_text())
    config["intermediate_size"] = 512
    (tmp_path / "qat" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError) as info:
        convert_checkpoint(tmp_path / "qat", tmp_path / "out")
    assert "intermediate_size" in info.value.message and "bitcpm fix-config" in info.value.hint


def test_packed_needs_ternary(tmp_path):
    make_qat(tmp_path / "qat", quant_type="int4")
    with pytest.raises(QuantError, match="ternary codes only"):
        convert_checkpoint(tmp_path / "qat", tmp_path / "out", fmt="packed")


def test_state_dict_plan_matches_model_plan(tiny_llama):
    scheme = QuantScheme(group_size=32, layers={r"v_proj": {"quant_type": "none"}})
    state = tiny_llama.state_dict()
    by_name = plan_state_dict({n: tuple(t.shape) for n, t in state.items()},
                              {n: str(t.dtype).removeprefix("torch.") for n, t in state.items()}, scheme)
    by_module = plan(tiny_llama, scheme)
    assert by_name == {f"{name}.weight": spec for name, spec in by_module.items()}


# ---- what "exact" means per output dtype (README, `bitcpm convert`) ---------------------------------------------
def qat_fused_weights(model) -> dict[str, torch.Tensor]:
    from bitcpm_cli.core.quant import qat_layers

    return {name + ".weight": layer.fused_weight().detach() for name, layer in qat_layers(model).items()}


def test_float32_output_is_the_qat_forward_bit_for_bit(tmp_path):
    qat = make_qat(tmp_path / "qat", dtype=torch.float32).eval()
    convert_checkpoint(tmp_path / "qat", tmp_path / "fused", dtype="float32")
    fused = load_file(tmp_path / "fused" / "model.safetensors")
    assert all(same_bytes(fused[n], w) for n, w in qat_fused_weights(qat).items())


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_16_bit_output_is_the_qat_forward_weights_rounded_once(tmp_path, dtype):
    """From a float32 checkpoint: the float32 fused weights, cast once (not the QAT model run in 16 bits, whose
    scales would come from rounded latent weights)."""
    qat = make_qat(tmp_path / "qat", dtype=torch.float32).eval()
    convert_checkpoint(tmp_path / "qat", tmp_path / "fused", dtype=dtype)
    fused = load_file(tmp_path / "fused" / "model.safetensors")
    assert all(same_bytes(fused[n], w.to(getattr(torch, dtype))) for n, w in qat_fused_weights(qat).items())


def test_bf16_output_of_a_bf16_checkpoint_is_its_qat_forward_in_bf16(tmp_path):
    from transformers import AutoModelForCausalLM

    make_qat(tmp_path / "qat", dtype=torch.bfloat16)
    qat = AutoModelForCausalLM.from_pretrained(tmp_path / "qat", dtype=torch.bfloat16).eval()
    prepare(qat, QuantScheme(group_size=128))
    convert_checkpoint(tmp_path / "qat", tmp_path / "fused", dtype="bfloat16")
    fused = load_file(tmp_path / "fused" / "model.safetensors")
    assert all(same_bytes(fused[n], w) for n, w in qat_fused_weights(qat).items())
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "fused", dtype=torch.bfloat16).eval()
    with torch.no_grad():
        assert torch.equal(stock(IDS).logits, qat(IDS).logits)


@pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="O_DIRECT is Linux's")
@pytest.mark.parametrize("fmt", ["fused", "packed"])
def test_the_output_is_the_same_whether_the_filesystem_takes_direct_io_or_not(tmp_path, monkeypatch, fmt):
    from bitcpm_cli.core.io import direct

    make_qat(tmp_path / "qat")
    opened, real_init = [], direct.DirectFile.__init__

    def spy(self, path):
        real_init(self, path)
        opened.append(self.direct)

    monkeypatch.setattr(direct.DirectFile, "__init__", spy)
    convert_checkpoint(tmp_path / "qat", tmp_path / "direct", fmt=fmt, verify=True, max_shard_bytes=20_000)
    if not all(opened):
        pytest.skip("this filesystem refuses O_DIRECT: both conversions would go through the page cache")
    refuse_direct_io_at_open(monkeypatch)
    convert_checkpoint(tmp_path / "qat", tmp_path / "buffered", fmt=fmt, verify=True, max_shard_bytes=20_000)
    shards = sorted(p.name for p in (tmp_path / "direct").glob("*.safetensors"))
    assert len(shards) > 1 and shards == sorted(p.name for p in (tmp_path / "buffered").glob("*.safetensors"))
    assert all((tmp_path / "direct" / n).read_bytes() == (tmp_path / "buffered" / n).read_bytes() for n in shards)


@pytest.mark.parametrize("group_size", [0, -1, 128, 32])
def test_a_fused_input_is_recognised_at_its_own_group_size(tmp_path, group_size):
    make_qat(tmp_path / "qat", group_size=group_size)
    convert_checkpoint(tmp_path / "qat", tmp_path / "fused")
    again = convert_checkpoint(tmp_path / "fused", tmp_path / "fused2")
    assert again.input_kind == "fused"
    assert f"every group of {plan_module._describe_group(group_size)} holds" in again.notes[0]


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="lists open files through /proc")
def test_a_failed_conversion_leaves_no_file_of_its_output_open(tmp_path):
    make_qat(tmp_path / "qat")
    weights = load_file(tmp_path / "qat" / "model.safetensors")
    weights["model.layers.1.mlp.down_proj.weight"][0, 0] = float("inf")  # late: earlier tensors are written first
    save_file(weights, tmp_path / "qat" / "model.safetensors", metadata={"format": "pt"})

    def open_files() -> list[str]:
        return [os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")
                if os.path.exists(f"/proc/self/fd/{fd}")]

    with pytest.raises(QuantError, match="down_proj"):
        convert_checkpoint(tmp_path / "qat", tmp_path / "fused")
    assert not [f for f in open_files() if ".bitcpm-tmp" in f]  # a deleted shard held open keeps its disk space
    assert not (tmp_path / "fused").exists()


@pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="O_DIRECT is Linux's")
@pytest.mark.parametrize("fmt", ["fused", "packed"])
def test_verify_reads_the_output_back_with_direct_io_on_a_thread_of_its_own_while_it_is_written(tmp_path,
                                                                                              monkeypatch, fmt):
    import threading

    from bitcpm_cli.core.io import direct
    from bitcpm_cli.core.io import safetensors as safetensors_io

    make_qat(tmp_path / "qat")
    monkeypatch.setattr(direct._Direct, "WINDOW", 16 * 1024)  # windows reach the disk long before the end
    events, real_init, real_check, real_close = [], direct.DirectReader.__init__, verify_module.Checker.check, \
        safetensors_io.SafetensorsStreamWriter.close

    def spy(self, path):
        real_init(self, path)
        events.append(("reader", path.name))

    def check(self, name, tensor):
        events.append(("check", threading.current_thread().name))
        return real_check(self, name, tensor)

    def close(self):
        events.append(("closed",))
        return real_close(self)

    monkeypatch.setattr(direct.DirectReader, "__init__", spy)
    monkeypatch.setattr(verify_module.Checker, "check", check)
    monkeypatch.setattr(safetensors_io.SafetensorsStreamWriter, "close", close)
    result = convert_checkpoint(tmp_path / "qat", tmp_path / "out", fmt=fmt, dtype="float32", verify=True,
                                max_shard_bytes=150_000)
    assert result.verify.ok and result.verify.tensors_checked == 21 and result.shards > 1
    readers = [e for e in events if e[0] == "reader"]
    assert len(readers) == result.shards
    checks = [e for e in events if e[0] == "check"]
    assert len(checks) == 21 and all(name.startswith("bitcpm-verify") for _, name in checks)
    assert events.index(checks[0]) < events.index(("closed",))  # checked while the first shard is still written


def test_a_verify_failure_or_a_conversion_failure_leaves_no_thread_and_no_output(tmp_path, monkeypatch):
    import threading

    make_qat(tmp_path / "qat")
    monkeypatch.setattr(verify_module.ReadBack, "same", lambda self, name, reference: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        convert_checkpoint(tmp_path / "qat", tmp_path / "fused", verify=True)
    monkeypatch.undo()
    weights = load_file(tmp_path / "qat" / "model.safetensors")
    weights["model.layers.1.mlp.down_proj.weight"][0, 0] = float("nan")
    save_file(weights, tmp_path / "qat" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(QuantError, match="down_proj"):
        convert_checkpoint(tmp_path / "qat", tmp_path / "fused", verify=True)
    assert not (tmp_path / "fused").exists()
    assert not [t for t in threading.enumerate() if t.name.startswith(("bitcpm-verify", "bitcpm-io", "bitcpm-read"))]


def test_verify_finds_bytes_changed_on_their_way_to_the_disk(tmp_path, monkeypatch):
    from bitcpm_cli.core.io import safetensors as safetensors_io

    make_qat(tmp_path / "qat")
    real_write = safetensors_io.SafetensorsStreamWriter.write

    def write(self, name, tensor):
        if name == "model.layers.1.self_attn.o_proj.weight":
            tensor = tensor.clone()
            tensor.view(-1)[-1] = -tensor.view(-1)[-1] if tensor.view(-1)[-1] != 0 else 1.0
        return real_write(self, name, tensor)

    monkeypatch.setattr(safetensors_io.SafetensorsStreamWriter, "write", write)
    with pytest.raises(convert_module.CheckFailed, match="1 tensor.*first: model.layers.1.self_attn.o_proj.weight"):
        convert_checkpoint(tmp_path / "qat", tmp_path / "fused", verify=True)
    assert not (tmp_path / "fused").exists()


def test_verify_reads_the_written_layout_back(tmp_path, monkeypatch):
    make_qat(tmp_path / "qat")
    real_index = write_module.ShardedWriter.write_index

    def swapped(self):  # two tensors named in each other's shard
        names = list(self.weight_map)
        first, last = names[0], names[-1]
        self.weight_map[first], self.weight_map[last] = self.weight_map[last], self.weight_map[first]
        real_index(self)

    monkeypatch.setattr(write_module.ShardedWriter, "write_index", swapped)
    with pytest.raises(convert_module.CheckFailed, match="verification failed: 2 tensor"):
        convert_checkpoint(tmp_path / "qat", tmp_path / "fused", verify=True, max_shard_bytes=100_000)
    assert not (tmp_path / "fused").exists()




@pytest.mark.parametrize("source", ["qat", "packed"])
def test_verify_of_a_bin_output_checks_the_reference_and_reads_the_saved_file_back(tmp_path, monkeypatch, source):
    make_qat(tmp_path / "qat")
    convert_checkpoint(tmp_path / "qat", tmp_path / "packed", fmt="packed")
    result = convert_checkpoint(tmp_path / source, tmp_path / "fused.bin", verify=True)
    assert result.verify.ok and result.verify.tensors_checked == 21
    real_save = torch.save

    def save_changed(state, path):  # what reaches the file differs from what was checked in memory
        real_save({**state, "model.norm.weight": state["model.norm.weight"] + 1}, path)

    monkeypatch.setattr(torch, "save", save_changed)
    with pytest.raises(convert_module.CheckFailed, match="first: model.norm.weight"):
        convert_checkpoint(tmp_path / source, tmp_path / "again.bin", verify=True)
    assert not (tmp_path / "again.bin").exists()


@pytest.mark.parametrize("source,fmt,output", [
    ("qat", "fused", "out.safetensors"), ("qat", "packed", "out.safetensors"), ("fused", "packed", "out"),
    ("packed", "fused", "out.safetensors"), ("packed", "fused", "out"), ("qat.bin", "fused", "out")])
def test_verify_passes_every_mode_and_output_kind_with_windows_reaching_the_disk_mid_file(tmp_path, monkeypatch,
                                                                                          source, fmt, output):
    from bitcpm_cli.core.io import direct

    make_qat(tmp_path / "qat")
    convert_checkpoint(tmp_path / "qat", tmp_path / "fused")
    convert_checkpoint(tmp_path / "qat", tmp_path / "packed", fmt="packed")
    torch.save(load_file(tmp_path / "qat" / "model.safetensors"), tmp_path / "qat.bin")
    monkeypatch.setattr(direct._Direct, "WINDOW", 8 * 1024)
    result = convert_checkpoint(tmp_path / source, tmp_path / output, fmt=fmt, verify=True, max_shard_bytes=60_000,
                                **({"quant_type": "ternary", "group_size": 128} if source == "qat.bin" else {}))
    assert result.verify.ok and result.verify.tensors_checked == 21
    assert result.shards == 1 if output.endswith(".safetensors") else result.shards > 1


def test_verify_reads_one_shard_at_a_time_and_closes_those_done(tmp_path, monkeypatch):
    make_qat(tmp_path / "qat")
    open_at_finish, real_finish = [], verify_module.Verifier.finish

    def finish(self, staging):  # every shard is written and closed by now: what is open is the read-back's
        open_at_finish.append([os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")
                               if ".bitcpm-tmp" in (os.readlink(f"/proc/self/fd/{fd}")
                                                    if os.path.exists(f"/proc/self/fd/{fd}") else "")])
        return real_finish(self, staging)

    monkeypatch.setattr(verify_module.Verifier, "finish", finish)
    result = convert_checkpoint(tmp_path / "qat", tmp_path / "out", fmt="packed", verify=True,
                                max_shard_bytes=20_000)
    assert result.verify.ok and result.shards > 5
    assert len(open_at_finish[0]) <= 1  # not a descriptor (and an 8 MiB window) per shard


def test_verify_reads_back_the_header_metadata_and_the_whole_index(tmp_path, monkeypatch):
    from bitcpm_cli.core.io import safetensors as safetensors_io

    make_qat(tmp_path / "qat")
    real_init = safetensors_io.SafetensorsStreamWriter.__init__

    def init(self, path, specs, metadata=None):  # a changed byte in the packed shapes: [128, 128] -> [128, 125]
        if metadata and write_module.PACKED_SHAPES_KEY in metadata:
            shapes = metadata[write_module.PACKED_SHAPES_KEY]
            metadata = {**metadata, write_module.PACKED_SHAPES_KEY: shapes.replace("[128,128]", "[128,125]", 1)}
        real_init(self, path, specs, metadata)

    monkeypatch.setattr(safetensors_io.SafetensorsStreamWriter, "__init__", init)
    with pytest.raises(convert_module.CheckFailed, match=r"first: model.safetensors \(metadata\)"):
        convert_checkpoint(tmp_path / "qat", tmp_path / "packed", fmt="packed", verify=True)
    monkeypatch.undo()
    real_index = write_module.ShardedWriter.write_index

    def index_with_more(self):  # an entry for no tensor, and a wrong total size
        self.weight_map["model.layers.9.mlp.up_proj.weight"] = self.names[0]
        self.total_size += 1
        real_index(self)
        self.total_size -= 1  # as planned

    monkeypatch.setattr(write_module.ShardedWriter, "write_index", index_with_more)
    with pytest.raises(convert_module.CheckFailed, match="verification failed: 2 tensor") as failed:
        convert_checkpoint(tmp_path / "qat", tmp_path / "fused", verify=True, max_shard_bytes=100_000)
    assert "model.layers.9.mlp.up_proj.weight" in str(failed.value.problems)
    assert not (tmp_path / "packed").exists() and not (tmp_path / "fused").exists()


def test_a_fused_input_with_negative_zeros_packs_and_verifies(tmp_path):
    make_qat(tmp_path / "qat", group_size=-1)
    convert_checkpoint(tmp_path / "qat", tmp_path / "fused", dtype="float32")
    weights = load_file(tmp_path / "fused" / "model.safetensors")
    for name in [n for n in weights if n.endswith("_proj.weight")]:  # what older versions wrote for code 0
        weights[name] = torch.where(weights[name] == 0, torch.tensor(-0.0), weights[name])
    save_file(weights, tmp_path / "fused" / "model.safetensors", metadata={"format": "pt"})
    result = convert_checkpoint(tmp_path / "fused", tmp_path / "packed", fmt="packed", dtype="float32", verify=True)
    assert result.verify.ok and result.verify.tensors_checked == 21


@pytest.mark.parametrize("change", ["padding", "scale of zero codes"])
def test_verify_compares_the_packed_codes_and_scales_byte_for_byte(tmp_path, monkeypatch, change):
    from bitcpm_cli.core.io import safetensors as safetensors_io

    torch.manual_seed(0)
    weight = torch.randn(8, 6)  # in_features 6: the last byte of a row holds two padding codes
    weight[3] = 0  # a row of zero codes: unpacking gives zeros whatever its scale
    save_file({"model.layers.0.mlp.up_proj.weight": weight, "model.norm.weight": torch.ones(6)},
              tmp_path / "in.safetensors")
    base = "model.layers.0.mlp.up_proj"
    real_write = safetensors_io.SafetensorsStreamWriter.write

    def write(self, name, tensor):  # bytes changed on their way to the disk
        if change == "padding" and name == base + ".weight_packed":
            tensor = tensor.clone()
            tensor[:, 1] ^= 0b0011_0000  # padding code 1 (zero) -> 2
        if change == "scale of zero codes" and name == base + ".weight_scale":
            tensor = tensor.clone()
            tensor[3] = 123.0
        return real_write(self, name, tensor)

    convert_checkpoint(tmp_path / "in.safetensors", tmp_path / "clean", fmt="packed", quant_type="ternary",
                       group_size=-1, verify=True)
    monkeypatch.setattr(safetensors_io.SafetensorsStreamWriter, "write", write)
    with pytest.raises(convert_module.CheckFailed, match=f"first: {base}.weight"):
        convert_checkpoint(tmp_path / "in.safetensors", tmp_path / "out", fmt="packed", quant_type="ternary",
                           group_size=-1, verify=True)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("source", ["qat", "packed"])
def test_the_progress_bars_count_exactly_to_their_totals(tmp_path, source):
    make_qat(tmp_path / "qat")
    convert_checkpoint(tmp_path / "qat", tmp_path / "packed", fmt="packed")
    done, totals = {}, {}

    def progress(stage, advance, total):
        done[stage] = done.get(stage, 0) + advance
        totals.setdefault(stage, set()).add(total)

    convert_checkpoint(tmp_path / source, tmp_path / "out", verify=True, progress=progress)
    assert set(done) == {"convert", "verify"}
    assert all(totals[stage] == {done[stage]} for stage in done)  # a bar that ends at 100 %, not short of it


def test_verify_puts_small_outputs_on_the_disk_early_rather_than_hold_their_inputs(tmp_path, monkeypatch):
    """A packed output (2 bits a weight) fills the writer's 8 MiB window slowly, while its inputs wait to be
    checked: past `WAITING` bytes of them, the writer puts what it has on the disk."""
    from bitcpm_cli.core.io import safetensors as safetensors_io

    make_qat(tmp_path / "qat")
    events, real_check, real_close = [], verify_module.Checker.check, safetensors_io.SafetensorsStreamWriter.close
    monkeypatch.setattr(verify_module.Checker, "check",
                        lambda self, name, tensor: events.append("check") or real_check(self, name, tensor))
    monkeypatch.setattr(safetensors_io.SafetensorsStreamWriter, "close",
                        lambda self: events.append("closed") or real_close(self))
    monkeypatch.setattr(verify_module.Verifier, "WAITING", 100_000)
    result = convert_checkpoint(tmp_path / "qat", tmp_path / "packed", fmt="packed", verify=True)
    assert result.verify.ok and result.shards == 1  # the whole file is far smaller than one 8 MiB window
    assert events.index("check") < events.index("closed")


def test_a_bin_in_the_format_before_torch_1_6_converts_like_any_other(tmp_path):
    make_qat(tmp_path / "qat")
    weights = load_file(tmp_path / "qat" / "model.safetensors")
    torch.save(weights, tmp_path / "legacy.bin", _use_new_zipfile_serialization=False)  # cannot be memory-mapped
    torch.save(weights, tmp_path / "zip.bin")
    scheme = {"quant_type": "ternary", "group_size": 128}
    convert_checkpoint(tmp_path / "legacy.bin", tmp_path / "a.safetensors", verify=True, **scheme)
    convert_checkpoint(tmp_path / "zip.bin", tmp_path / "b.safetensors", **scheme)
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
