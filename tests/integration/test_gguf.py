"""GGUF export (needs gguf-py) and the llama.cpp engine (needs llama-cpp-python): the `gguf` extra."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf", reason="GGUF tests need the gguf extra: pip install -e '.[gguf]'")

from bitcpm_cli.core.conversion.convert import convert_checkpoint
from bitcpm_cli.core.errors import InputError
from bitcpm_cli.core.conversion.gguf.export import export_gguf

TOKENIZER = Path(__file__).resolve().parents[2] / "configs" / "quickstart" / "tokenizer"


def qat_model(folder: Path, group_size: int, vocab_size: int = 512, **config) -> Path:
    """A random QAT model with 256-multiple dims (unless `config` overrides them) and the quickstart's
    SentencePiece-style tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from bitcpm_cli.core.quant import QuantScheme, prepare

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{
        "vocab_size": vocab_size, "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64, "max_position_embeddings": 256,
        "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3, **config}))
    with torch.no_grad():  # logits with clear winners, so that two engines' rounding cannot flip a greedy choice
        model.lm_head.weight.mul_(20)
    prepare(model, QuantScheme(group_size=group_size))
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(TOKENIZER).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def exact(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    qat_model(root / "qat", group_size=-1)
    convert_checkpoint(root / "qat", root / "fused", dtype="float16")
    return root


def permute(w, heads):
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.mark.parametrize("gguf_type", ["tq2_0", "tq1_0"])
def test_export_dequantizes_exactly(exact, tmp_path, gguf_type):
    from safetensors.torch import load_file

    result = export_gguf(exact / "qat", tmp_path / f"m-{gguf_type}.gguf", gguf_type=gguf_type)
    assert result.exact and result.ternary_tensors == 14 and result.max_abs_error == 0
    fused = {k: v.float().numpy() for k, v in load_file(exact / "fused" / "model.safetensors").items()}
    reader = gguf.GGUFReader(str(tmp_path / f"m-{gguf_type}.gguf"))
    tensors = {t.name: t for t in reader.tensors}
    q = tensors["blk.1.attn_q.weight"]
    assert q.tensor_type.name == gguf_type.upper()
    values = gguf.quants.dequantize(np.asarray(q.data), q.tensor_type).reshape(256, 256)
    assert np.array_equal(values, permute(fused["model.layers.1.self_attn.q_proj.weight"], 4))
    down = tensors["blk.0.ffn_down.weight"]
    values = gguf.quants.dequantize(np.asarray(down.data), down.tensor_type).reshape(256, 512)
    assert np.array_equal(values, fused["model.layers.0.mlp.down_proj.weight"])
    assert tensors["token_embd.weight"].tensor_type == gguf.GGMLQuantizationType.F16
    assert tensors["output_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    fields = reader.fields
    assert int(fields["llama.block_count"].parts[-1][0]) == 2 and int(fields["llama.attention.head_count_kv"].parts[-1][0]) == 2
    assert bytes(fields["tokenizer.ggml.model"].parts[-1]).decode() == "llama"


def test_packed_and_fused_inputs_export_the_same_blocks(exact, tmp_path):
    convert_checkpoint(exact / "qat", tmp_path / "packed", fmt="packed", dtype="float16")
    export_gguf(exact / "fused", tmp_path / "a.gguf")
    export_gguf(tmp_path / "packed", tmp_path / "b.gguf")
    a, b = gguf.GGUFReader(str(tmp_path / "a.gguf")), gguf.GGUFReader(str(tmp_path / "b.gguf"))
    for x, y in zip(a.tensors, b.tensors):
        assert x.name == y.name and np.array_equal(np.asarray(x.data), np.asarray(y.data))


def test_inexact_group_size_is_refused_with_the_reason(tmp_path, invoke):
    qat_model(tmp_path / "g128", group_size=128)
    result = invoke("convert", "-i", tmp_path / "g128", "-o", tmp_path / "m.gguf", "--format", "gguf")
    assert result.exit_code == 1
    assert "more than one scale" in result.stderr and "group size -1 or a multiple of 256" in result.stderr
    assert not (tmp_path / "m.gguf").exists()
    lossy = export_gguf(tmp_path / "g128", tmp_path / "m.gguf", allow_lossy=True)
    assert not lossy.exact and lossy.max_abs_error > 0 and "allow-lossy" in lossy.warnings[-1]


def test_byte_level_tokenizer_is_refused(tmp_path):
    from tests.helpers import build_char_tokenizer

    qat_model(tmp_path / "m", group_size=-1)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "m" / name).unlink()
    build_char_tokenizer(tmp_path / "m")
    with pytest.raises(InputError, match="cannot export the tokenizer") as info:
        export_gguf(tmp_path / "m", tmp_path / "m.gguf")
    assert "SentencePiece-style" in info.value.hint
    assert not (tmp_path / "m.gguf").exists()


def test_output_must_be_a_gguf_file(exact, tmp_path):
    with pytest.raises(InputError, match=".gguf file"):
        export_gguf(exact / "qat", tmp_path / "m.bin")


# ---- exact for every group size: --gguf-type auto ----------------------------------------------------------------
LINEAR_NAMES = [f"model.layers.{i}.{m}.weight" for i in range(2) for m in
                ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                 "mlp.up_proj", "mlp.down_proj")]


@pytest.fixture(scope="module")
def grouped(tmp_path_factory):
    root = tmp_path_factory.mktemp("g128")
    qat_model(root / "qat", group_size=128)
    convert_checkpoint(root / "qat", root / "fused", dtype="float16")
    return root


def assert_decodes_to_fused(path: Path, fused_folder: Path, expected_type: str) -> None:
    """Every quantized linear in the file, dequantized by gguf-py (ggml's layouts), equals the fused weight."""
    from safetensors.torch import load_file

    fused = load_file(fused_folder / "model.safetensors")
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
    tensors = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
    for name in LINEAR_NAMES:
        tensor = tensors[names.get_name(name, try_suffixes=(".weight",))]
        assert tensor.tensor_type.name == expected_type, name
        expected = fused[name].float().numpy()
        if "q_proj" in name or "k_proj" in name:
            expected = permute(expected, 4 if "q_proj" in name else 2)
        values = gguf.quants.dequantize(np.asarray(tensor.data), tensor.tensor_type).reshape(expected.shape)
        assert np.array_equal(values, expected), name


def test_auto_writes_a_group_128_model_exactly_as_q4_0(grouped, tmp_path):
    result = export_gguf(grouped / "qat", tmp_path / "m.gguf", gguf_type="auto")
    assert result.exact and result.max_abs_error == 0 and result.ternary_tensors == 14
    assert result.tensor_types == {"Q4_0": 14, "F16": 2, "F32": 5}
    assert result.linear_bits_per_weight == 4.5  # 18 bytes per 32 weights
    assert_decodes_to_fused(tmp_path / "m.gguf", grouped / "fused", "Q4_0")
    fields = gguf.GGUFReader(str(tmp_path / "m.gguf")).fields
    assert int(fields["general.file_type"].parts[-1][0]) == gguf.LlamaFileType.MOSTLY_Q4_0


def test_auto_takes_tq2_0_where_every_256_block_has_one_scale(exact, tmp_path):
    result = export_gguf(exact / "qat", tmp_path / "m.gguf", gguf_type="auto")
    assert result.tensor_types["TQ2_0"] == 14 and result.exact
    assert_decodes_to_fused(tmp_path / "m.gguf", exact / "fused", "TQ2_0")


def test_auto_writes_q8_0_when_a_32_block_holds_scales_that_are_multiples(tmp_path):
    """Group size 16 with power-of-two scales: two scales per 32-block, one the other times 1 or 2 or 4."""
    from safetensors.torch import load_file, save_file

    qat_model(tmp_path / "qat", group_size=16)
    weights = load_file(tmp_path / "qat" / "model.safetensors")
    generator = torch.Generator().manual_seed(1)
    for name in LINEAR_NAMES:
        rows, columns = weights[name].shape
        magnitude = 2.0 ** -torch.randint(5, 8, (rows, columns // 16, 1), generator=generator).float()
        signs = torch.randint(0, 2, (rows, columns // 16, 16), generator=generator).float() * 2 - 1
        weights[name] = (signs * magnitude).reshape(rows, columns)
    save_file(weights, tmp_path / "qat" / "model.safetensors", metadata={"format": "pt"})
    convert_checkpoint(tmp_path / "qat", tmp_path / "fused")
    result = export_gguf(tmp_path / "qat", tmp_path / "m.gguf", gguf_type="auto")
    assert result.exact and result.tensor_types["Q8_0"] == 14
    assert_decodes_to_fused(tmp_path / "m.gguf", tmp_path / "fused", "Q8_0")


def test_strict_type_is_refused_before_reading_weights_with_grouped_layers(grouped, tmp_path, invoke, monkeypatch):
    from bitcpm_cli.core.conversion import plan as convert

    def no_reading(*args, **kwargs):
        raise AssertionError("a tensor was read before the refusal")

    monkeypatch.setattr(convert, "iter_tensors", no_reading)
    result = invoke("convert", "-i", grouped / "qat", "-o", tmp_path / "m.gguf", "--format", "gguf")
    assert result.exit_code == 1, result.output
    assert ("group size 128 puts more than one scale in a block of 256: 14 linear(s): model.layers.{0-1}.{"
            "mlp.down_proj, mlp.gate_proj, mlp.up_proj, self_attn.k_proj, self_attn.o_proj, self_attn.q_proj, "
            "self_attn.v_proj}") in " ".join(result.stderr.split())
    assert result.stderr.count("more than one scale") == 1
    assert "--gguf-type auto" in result.stderr and not (tmp_path / "m.gguf").exists()


def test_auto_refuses_rows_that_no_block_fits_naming_the_layers(tmp_path):
    from bitcpm_cli.core.conversion.gguf.export import _Entry, _plan_type

    entry = _Entry("model.layers.3.mlp.down_proj.weight", "blk.3.ffn_down.weight", (64, 48), "", True, -1)
    assert _plan_type(entry, "auto") == ("Q8_0", "rows of 48 values are not a multiple of 32 (the smallest GGUF "
                                                 "block)")
    assert _plan_type(entry, "tq1_0")[1] == "rows of 48 values are not a multiple of 256"


def test_block_decoders_match_gguf_py():
    from bitcpm_cli.core.formats.gguf_blocks import decode_block_type, encode_block_type

    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(8, 512, generator=generator).to(torch.bfloat16).float()
    for type_name in ("TQ2_0", "Q4_0", "Q8_0"):
        raw = encode_block_type(weight, type_name)
        ours = decode_block_type(raw, type_name, weight.shape).numpy()
        theirs = gguf.quants.dequantize(raw.numpy(), gguf.GGMLQuantizationType[type_name]).reshape(weight.shape)
        assert np.array_equal(ours, theirs), type_name


@pytest.mark.parametrize("type_name", ["TQ2_0", "Q4_0", "Q8_0"])
def test_blocks_of_rows_encode_and_check_as_one_pass_does(monkeypatch, type_name):
    from bitcpm_cli.core.formats.gguf_blocks import encode_block_type, reproduces
    from bitcpm_cli.core.quant import LayerQuant, fake_quantize, functional

    generator = torch.Generator().manual_seed(1)
    fused = fake_quantize(torch.randn(96, 512, generator=generator), LayerQuant("ternary", -1), dtype=torch.bfloat16)
    one_pass = encode_block_type(fused, type_name)
    assert reproduces(one_pass, type_name, fused)
    monkeypatch.setattr(functional, "BLOCK_ELEMENTS", 4096)  # 16 rows a block: six blocks
    with functional.row_blocks(fused) as blocks:
        assert len(blocks) == 6
    assert torch.equal(encode_block_type(fused, type_name), one_pass)
    assert reproduces(one_pass, type_name, fused)
    broken = fused.clone()
    broken[90, 7] = broken[90, 7] * 1.5  # in the last block only: no block of codes times one scale holds it
    assert not reproduces(encode_block_type(broken, type_name), type_name, broken)


# ---- the llama.cpp engine -----------------------------------------------------------------------------
def agree_with_transformers(gguf_file: Path, fused: Path, tmp_path: Path, invoke, dtype: str,
                            near_ties: bool = False, activations: str | None = None) -> None:
    """Greedy tokens equal (with `near_ties`: or parted only at a near tie, which `compare` tells from a bug);
    `activations`: the transformers run quantizes its linears' inputs as llama.cpp does for the file's block type."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("23 24 25 26\ncontinue: 47 48 49\nhéllo Zebra!\n")
    llama = invoke("infer", "--engine", "llama.cpp", "-m", gguf_file, "--prompts", prompts, "-o",
                   tmp_path / "llama.json", "--max-new-tokens", "12", "--logprobs", "3", "-q")
    assert llama.exit_code == 0, llama.output
    hf = invoke("infer", "-m", fused, "--prompts", prompts, "-o", tmp_path / "hf.json", "--max-new-tokens",
                "12", "--logprobs", "3", "-q", "--dtype", "float32", "--device", "cpu",
                *(["--activations", activations] if activations else []))
    assert hf.exit_code == 0, hf.output
    a, b = (json.loads((tmp_path / f).read_text()) for f in ("llama.json", "hf.json"))
    assert a["runtime"]["engine"] == "llama.cpp" and a["model"]["format"] == "gguf" and a["model"]["dtype"] == dtype
    assert [r["prompt_token_ids"] for r in a["results"]] == [r["prompt_token_ids"] for r in b["results"]]
    compared = invoke("compare", tmp_path / "llama.json", tmp_path / "hf.json")
    if near_ties:
        assert "diverged" not in compared.output and "largest top-1 logprob difference" in compared.output
        return
    assert [r["token_ids"] for r in a["results"]] == [r["token_ids"] for r in b["results"]]
    assert compared.exit_code == 0 and "3/3 prompts identical" in compared.output


def test_llamacpp_agrees_with_transformers(exact, tmp_path, invoke):
    pytest.importorskip("llama_cpp", reason="llama.cpp tests need llama-cpp-python (the gguf extra)")
    assert invoke("convert", "-i", exact / "qat", "-o", tmp_path / "m.gguf", "--format", "gguf").exit_code == 0
    agree_with_transformers(tmp_path / "m.gguf", exact / "fused", tmp_path, invoke, "tq2_0")


def test_llamacpp_agrees_with_transformers_on_a_group_128_model(grouped, tmp_path, invoke):
    pytest.importorskip("llama_cpp", reason="llama.cpp tests need llama-cpp-python (the gguf extra)")
    converted = invoke("convert", "-i", grouped / "qat", "-o", tmp_path / "m.gguf", "--format", "gguf",
                       "--gguf-type", "auto")
    assert converted.exit_code == 0, converted.output
    assert "Q4_0 x14" in converted.stdout and "bits/weight (linears 4.500)" in converted.stdout
    agree_with_transformers(tmp_path / "m.gguf", grouped / "fused", tmp_path, invoke, "q4_0", activations="q8_0")


def test_llamacpp_engine_input_errors(exact, tmp_path, invoke):
    pytest.importorskip("llama_cpp", reason="llama.cpp tests need llama-cpp-python (the gguf extra)")
    result = invoke("infer", "--engine", "llama.cpp", "-m", exact / "fused", "-p", "1", "-o", tmp_path / "r.json")
    assert result.exit_code == 2 and "takes a .gguf file" in result.stderr
    shutil.copy(exact / "fused" / "config.json", tmp_path / "fake.gguf")
    result = invoke("infer", "--engine", "llama.cpp", "-m", tmp_path / "fake.gguf", "-p", "1", "-o", tmp_path / "r.json")
    assert result.exit_code == 2 and "cannot load" in result.stderr
    assert not (tmp_path / "r.json").exists()


def test_byte_level_bpe_tokenizer_round_trips_through_llamacpp(tmp_path, invoke):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    qat_model(tmp_path / "m", group_size=-1)
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    corpus = (TOKENIZER.parent / "corpus.txt").read_text().splitlines()[:500] + ["héllo Zebra, how are you?"]
    core.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>"],
                                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                         show_progress=False))
    hf = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "m" / name).unlink()
    hf.save_pretrained(tmp_path / "m")
    export_gguf(tmp_path / "m", tmp_path / "m.gguf")
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    assert bytes(reader.fields["tokenizer.ggml.model"].parts[-1]).decode() == "gpt2"
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama.cpp tests need llama-cpp-python (the gguf extra)")
    llm = llama_cpp.Llama(model_path=str(tmp_path / "m.gguf"), n_ctx=64, verbose=False)
    for text in ("23 24 25 26", "héllo Zebra, how are you?", "  spaces  and\nlines"):
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == hf(text)["input_ids"], text


# ---- architectures ------------------------------------------------------------------------------------------------
def edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def longrope(attention_factor=None) -> dict:
    generator = torch.Generator().manual_seed(3)
    rope = {"rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 256,
            "short_factor": (1 + 30 * torch.rand(32, generator=generator)).tolist(),
            "long_factor": (0.2 + 0.3 * torch.rand(32, generator=generator)).tolist()}
    if attention_factor is not None:
        rope["attention_factor"] = attention_factor
    return rope


def logprobs_llamacpp(path: Path, ids: list[int]) -> torch.Tensor:
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama.cpp tests need llama-cpp-python (the gguf extra)")
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=0, logits_all=True, verbose=False)
    llm.eval(ids)
    return torch.log_softmax(torch.tensor(np.array(llm.scores[:len(ids)])).double(), -1)


def logprobs_transformers(folder: Path, ids: list[int], **config_changes) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    if config_changes:
        copy = folder.parent / f"{folder.name}-variant"
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(folder, copy)
        edit_config(copy, **config_changes)
        folder = copy
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)


def test_longrope_is_exported_as_transformers_applies_it(tmp_path, invoke):
    """Below the original context transformers scales the rotary frequencies by short_factor and cos / sin by the
    attention factor; llama.cpp's logits must be nearer to that model than to the same model without them, with the
    long factors, or without the attention factor (the distance left is llama.cpp's 8-bit activations)."""
    qat_model(tmp_path / "qat", group_size=-1)
    rope = longrope(attention_factor=1.6)
    edit_config(tmp_path / "qat", rope_parameters=rope, max_position_embeddings=1024)
    convert_checkpoint(tmp_path / "qat", tmp_path / "fused", dtype="float16")
    result = export_gguf(tmp_path / "qat", tmp_path / "m.gguf")
    assert result.architecture == "minicpm" and "LongRoPE" in " ".join(result.notes)
    ids = [1] + list(range(40, 140, 2))
    llama = logprobs_llamacpp(tmp_path / "m.gguf", ids)
    distance = {}
    for label, changes in {"longrope": {}, "no rope factors": {"rope_parameters": {"rope_type": "default",
                                                                                   "rope_theta": 10000.0}},
                           "long factors": {"rope_parameters": {**rope, "short_factor": rope["long_factor"]}},
                           "no attention factor": {"rope_parameters": {**rope, "attention_factor": 1.0}}}.items():
        distance[label] = float((logprobs_transformers(tmp_path / "fused", ids, **changes) - llama).abs().mean())
    assert all(distance["longrope"] < 0.75 * d for label, d in distance.items() if label != "longrope"), distance
    agree_with_transformers(tmp_path / "m.gguf", tmp_path / "fused", tmp_path, invoke, "tq2_0", near_ties=True)


def minicpm_reference(fused: Path, folder: Path, scale_emb: float, scale_depth: float, dim_model_base: int) -> Path:
    """transformers 5.24 has no MiniCPM (only remote code, which tests never run): the reference is the fused model
    as a float32 Llama with MiniCPM's three scales folded into its weights, exactly where MiniCPM applies them
    (embeddings x scale_emb; attention and MLP outputs x scale_depth / sqrt(layers) before the residual add;
    the final hidden state / (hidden_size / dim_model_base) before lm_head)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(fused, folder)
    config = json.loads((folder / "config.json").read_text())
    weights = {k: v.float() for k, v in load_file(fused / "model.safetensors").items()}
    weights["model.embed_tokens.weight"] *= scale_emb
    residual = scale_depth / config["num_hidden_layers"] ** 0.5
    for name in weights:
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            weights[name] *= residual
    weights["lm_head.weight"] /= config["hidden_size"] / dim_model_base
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    edit_config(folder, dtype="float32")
    return folder


@pytest.mark.parametrize("rope", [None, "longrope"])
def test_minicpm_is_exported_with_its_scales(tmp_path, invoke, rope):
    pytest.importorskip("llama_cpp", reason="llama.cpp tests need llama-cpp-python (the gguf extra)")
    qat_model(tmp_path / "qat", group_size=-1)
    changes = {"rope_parameters": longrope(), "max_position_embeddings": 1024} if rope else {}
    convert_checkpoint(tmp_path / "qat", tmp_path / "fused")
    minicpm_reference(tmp_path / "fused", tmp_path / "reference", 12.0, 1.4, 64)
    edit_config(tmp_path / "reference", **changes)
    edit_config(tmp_path / "qat", model_type="minicpm", architectures=["MiniCPMForCausalLM"], scale_emb=12,
                scale_depth=1.4, dim_model_base=64, **changes)
    result = export_gguf(tmp_path / "qat", tmp_path / "m.gguf")
    assert result.architecture == "minicpm" and result.exact
    fields = gguf.GGUFReader(str(tmp_path / "m.gguf")).fields
    assert float(fields["minicpm.embedding_scale"].parts[-1][0]) == 12.0
    assert float(fields["minicpm.residual_scale"].parts[-1][0]) == pytest.approx(1.4 / 2 ** 0.5)
    assert float(fields["minicpm.logit_scale"].parts[-1][0]) == 4.0
    agree_with_transformers(tmp_path / "m.gguf", tmp_path / "reference", tmp_path, invoke, "tq2_0",
                            near_ties=rope is not None)


def test_a_parameter_llamacpp_would_ignore_is_refused_by_name(tmp_path, invoke):
    qat_model(tmp_path / "qat", group_size=-1)
    edit_config(tmp_path / "qat", rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                                                   "original_max_position_embeddings": 64})
    result = invoke("convert", "-i", tmp_path / "qat", "-o", tmp_path / "m.gguf", "--format", "gguf")
    assert result.exit_code == 1 and "rope type 'yarn'" in result.stderr
    assert not (tmp_path / "m.gguf").exists()


# ---- metadata, embeddings, chat templates --------------------------------------------------------------------------
def test_metadata_as_llamacpp_writes_it_and_bf16_embeddings(exact, tmp_path):
    from safetensors.torch import load_file

    result = export_gguf(exact / "qat", tmp_path / "m.gguf", embeddings="bf16")
    assert result.tensor_types == {"TQ2_0": 14, "BF16": 2, "F32": 5}
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    fields = reader.fields
    assert int(fields["general.quantization_version"].parts[-1][0]) == gguf.GGML_QUANT_VERSION
    assert int(fields["general.file_type"].parts[-1][0]) == gguf.LlamaFileType.MOSTLY_TQ2_0
    assert bytes(fields["general.size_label"].parts[-1]).decode().endswith("M")
    assert bytes(fields["general.name"].parts[-1]).decode() == "qat"
    # with bf16 embeddings the file holds the bfloat16 fused model bit for bit, its ternary blocks included
    convert_checkpoint(exact / "qat", tmp_path / "fused-bf16", dtype="bfloat16")
    fused = load_file(tmp_path / "fused-bf16" / "model.safetensors")
    embed = next(t for t in reader.tensors if t.name == "token_embd.weight")
    assert np.asarray(embed.data).tobytes() == fused["model.embed_tokens.weight"].view(torch.int16).numpy().tobytes()
    q = next(t for t in reader.tensors if t.name == "blk.1.attn_q.weight")
    values = gguf.quants.dequantize(np.asarray(q.data), q.tensor_type).reshape(256, 256)
    assert np.array_equal(values, permute(fused["model.layers.1.self_attn.q_proj.weight"].float().numpy(), 4))


def test_values_beyond_float16_are_refused_not_written_as_inf(exact, tmp_path):
    """A GGUF holds the float16 fused model (bfloat16 with --gguf-embeddings bf16): an embedding beyond float16's
    65504 is refused (exit 2, nothing written), for `convert --dtype float16` too, and exported with bf16 embeddings."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(exact / "qat", tmp_path / "qat")
    weights = load_file(tmp_path / "qat" / "model.safetensors")
    weights["model.embed_tokens.weight"][5, 7] = 1.0e5
    save_file(weights, tmp_path / "qat" / "model.safetensors", metadata={"format": "pt"})
    for attempt in (lambda: export_gguf(tmp_path / "qat", tmp_path / "m.gguf"),
                    lambda: convert_checkpoint(tmp_path / "qat", tmp_path / "fused", dtype="float16")):
        with pytest.raises(InputError, match="model.embed_tokens.weight has values beyond float16's range") as error:
            attempt()
        assert "bfloat16" in error.value.hint
    assert not (tmp_path / "m.gguf").exists() and not (tmp_path / "fused").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["qat"]
    result = export_gguf(tmp_path / "qat", tmp_path / "m.gguf", embeddings="bf16")
    assert result.exact and result.tensor_types["BF16"] == 2


def test_packed_scales_beyond_float16_are_refused_whatever_order_the_pair_comes_in(exact, tmp_path):
    """A packed folder's bfloat16 scale beyond 65504, unpacked to float16: refused naming the scale tensor, nothing
    written (safetensors stores the bf16 scales before the uint8 codes, so the codes complete the pair)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    convert_checkpoint(exact / "qat", tmp_path / "packed", fmt="packed")
    weights_file = tmp_path / "packed" / "model.safetensors"
    with safe_open(weights_file, "pt") as handle:
        metadata = handle.metadata()
    weights = load_file(weights_file)
    name = "model.layers.0.mlp.down_proj.weight_scale"
    assert weights[name].dtype == torch.bfloat16
    weights[name][0] = 1.0e5
    save_file(weights, weights_file, metadata=metadata)
    with pytest.raises(InputError, match=f"{name} has values beyond float16's range"):
        convert_checkpoint(tmp_path / "packed", tmp_path / "fused", dtype="float16")
    with pytest.raises(InputError, match=f"{name} has values beyond float16's range"):
        export_gguf(tmp_path / "packed", tmp_path / "m.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["packed"]


def test_llama_config_with_minicpm_scales_gets_a_note(tmp_path):
    qat_model(tmp_path / "qat", group_size=-1)
    edit_config(tmp_path / "qat", scale_emb=12)
    result = export_gguf(tmp_path / "qat", tmp_path / "m.gguf")
    assert result.architecture == "llama"
    assert any("sets scale_emb but model_type 'llama' does not use them" in note for note in result.notes)


def test_llamacpp_engine_renders_chat_templates_with_transformers_renderer(tmp_path, invoke):
    pytest.importorskip("llama_cpp", reason="llama.cpp tests need llama-cpp-python (the gguf extra)")
    from transformers import AutoTokenizer

    qat_model(tmp_path / "qat", group_size=-1)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "qat")
    tokenizer.chat_template = (
        "{% if messages[0]['role'] == 'tool' %}{{ raise_exception('no tool messages') }}{% endif %}"
        "{% set year = strftime_now('%Y') %}{% for m in messages %}{% if m['role'] == 'assistant' %}"
        "{{ ' ' + m['content'] + eos_token }}{% else %}{{ '<|im_start|>' + m['content'] }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ ' ' }}{% endif %}")
    tokenizer.save_pretrained(tmp_path / "qat")
    convert_checkpoint(tmp_path / "qat", tmp_path / "fused")
    assert invoke("convert", "-i", tmp_path / "qat", "-o", tmp_path / "m.gguf", "--format", "gguf").exit_code == 0
    runs = {}
    for label, args in {"llama": ["--engine", "llama.cpp", "-m", tmp_path / "m.gguf"],
                        "hf": ["-m", tmp_path / "fused", "--dtype", "float32", "--device", "cpu"]}.items():
        done = invoke("infer", *args, "--chat", "-p", "continue: 47 48 49", "-o", tmp_path / f"{label}.json",
                      "--max-new-tokens", "4", "-q")
        assert done.exit_code == 0, done.output
        runs[label] = json.loads((tmp_path / f"{label}.json").read_text())["results"][0]["prompt_token_ids"]
    assert runs["llama"] == runs["hf"]
