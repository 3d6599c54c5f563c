"""`infer` and `eval` run each model with its activation scheme (issue #25) and say which: a W1.58A8 QAT checkpoint,
its `bitcpm convert` output (the same logits, the same tokens), a GGUF file as llama.cpp runs it, the --activations
override, and every refusal (exit 2, one error line, nothing written)."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.helpers import bitcpm_in_process, bitcpm_script

TOKENIZER = Path(__file__).resolve().parents[2] / "configs" / "quickstart" / "tokenizer"
PROMPT = "the cat sat on the"


@pytest.fixture(scope="module")
def a8(tmp_path_factory):
    """A q8_k QAT checkpoint of the quickstart's shape (one layer), its fused conversion through `bitcpm convert`
    (in-process: tests/cli/test_convert_activations_cli.py runs the installed script), and (with the gguf extra) its
    TQ2_0 GGUF."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from bitcpm_cli.core.quant import QuantScheme, prepare

    root = tmp_path_factory.mktemp("a8-cli")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                                         max_position_embeddings=256, tie_word_embeddings=False, bos_token_id=1,
                                         eos_token_id=2, pad_token_id=3))
    with torch.no_grad():  # clear winners, so that rounding cannot flip a greedy choice
        model.lm_head.weight.mul_(20)
    prepare(model, QuantScheme(group_size=-1, activations="q8_k"))
    model.save_pretrained(root / "qat")
    AutoTokenizer.from_pretrained(TOKENIZER).save_pretrained(root / "qat")
    converted = bitcpm_in_process("convert", "-i", root / "qat", "-o", root / "fused", "--dtype", "float32")
    assert converted.returncode == 0, converted.stderr
    lines = (TOKENIZER.parent / "corpus.txt").read_text().splitlines()[:8]
    (root / "t.txt").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="module")
def gguf_file(a8):
    pytest.importorskip("gguf", reason="GGUF tests need the gguf extra: pip install -e '.[gguf]'")
    pytest.importorskip("llama_cpp", reason="llama.cpp tests need llama-cpp-python (the gguf extra)")
    from bitcpm_cli.core.conversion.gguf.export import export_gguf

    export_gguf(a8 / "qat", a8 / "m.gguf")
    return a8 / "m.gguf"


def test_convert_records_the_scheme_and_the_fused_model_scores_the_qat_a8_forward(a8, gguf_file):
    assert json.loads((a8 / "fused" / "config.json").read_text())["bitcpm_activations"]["q8_k"] == [
        f"model.layers.0.{m}" for m in ("mlp.down_proj", "mlp.gate_proj", "mlp.up_proj", "self_attn.k_proj",
                                        "self_attn.o_proj", "self_attn.q_proj", "self_attn.v_proj")]
    result = bitcpm_script("eval", "-m", a8 / "qat", "-m", a8 / "fused", "-m", gguf_file, "--data", a8 / "t.txt",
                           "--context", "64", "--device", "cpu", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    qat, fused, gguf = report["models"]
    assert report["settings"]["activations"] is None
    assert (qat["activations"], fused["activations"]) == ("q8_k", "q8_k")
    assert gguf["activations"] == "llama.cpp: q8_k (TQ2_0), f16 (F16)"
    assert fused["vs_reference"]["mean_kld"] == 0 and fused["vs_reference"]["max_kld"] == 0
    assert fused["vs_reference"]["same_top_pct"] == 100 and fused["mean_nll"] == qat["mean_nll"]
    assert "activations: q8_k on 7 linears (recorded in config.json's bitcpm_activations)" in fused["notes"]


def test_the_override_measures_the_same_weights_a16_and_leaves_llamacpp_as_it_runs(a8, gguf_file, invoke):
    args = ["eval", "-m", a8 / "qat", "-m", a8 / "fused", "-m", gguf_file, "--data", a8 / "t.txt", "--context", "64",
            "--device", "cpu"]
    a16 = invoke(*args, "--json", "--activations", "none")
    assert a16.exit_code == 0, a16.output
    report = json.loads(a16.stdout)
    qat, fused, gguf = report["models"]
    assert report["settings"]["activations"] == "none"
    assert (qat["activations"], fused["activations"]) == ("none", "none")
    assert fused["vs_reference"]["mean_kld"] == 0
    assert gguf["activations"] == "llama.cpp: q8_k (TQ2_0), f16 (F16)"
    assert "--activations none does not apply: llama.cpp quantizes activations by the weights' tensor type" \
        in gguf["notes"][-1]
    a8_run = json.loads(invoke(*args, "--json").stdout)
    assert a8_run["models"][0]["mean_nll"] != qat["mean_nll"]  # the same weights, measured both ways
    table = invoke(*args, "--activations", "int8-token")
    assert table.exit_code == 0 and "activations" in table.stdout and "int8-token" in table.stdout


def test_infer_gives_the_same_tokens_for_the_qat_checkpoint_and_its_fused_output(a8, invoke, tmp_path):
    documents = {}
    for name in ("qat", "fused"):
        result = invoke("infer", "-m", a8 / name, "-p", PROMPT, "-o", tmp_path / f"{name}.json", "--dtype", "float32",
                        "--device", "cpu", "--max-new-tokens", "8", "--logprobs", "3", "--quiet")
        assert result.exit_code == 0, result.output
        documents[name] = json.loads((tmp_path / f"{name}.json").read_text())
        assert documents[name]["model"]["activations"] == "q8_k"
    qat, fused = (documents[n]["results"][0] for n in ("qat", "fused"))
    assert qat["token_ids"] == fused["token_ids"] and qat["top_logprobs"][0] == fused["top_logprobs"][0]
    # Later decoding steps agree to float32 BLAS rounding only (weights mapped from a file vs fused in memory: another
    # alignment, as without activation quantization); `eval` compares whole-sequence logits exactly (KLD 0).
    plain = invoke("infer", "-m", a8 / "fused", "-p", PROMPT, "-o", tmp_path / "a16.json", "--dtype", "float32",
                   "--device", "cpu", "--max-new-tokens", "8", "--logprobs", "3", "--quiet", "--activations", "none")
    assert plain.exit_code == 0, plain.output
    document = json.loads((tmp_path / "a16.json").read_text())
    assert document["model"]["activations"] == "none"
    assert max(abs(x[1] - y[1]) for x, y in zip(document["results"][0]["top_logprobs"][0], fused["top_logprobs"][0])) \
        > 1e-3  # the first step's logits are exact: A16 is another forward
    compared = invoke("compare", tmp_path / "fused.json", tmp_path / "a16.json")
    assert "activation schemes differ: q8_k in A, none in B" in compared.output


def refused(*args, output: Path, installed: bool = False) -> str:
    """Exit 2, one error line, nothing written; through the installed script, or in-process where the first refusal
    already ran the script."""
    result = (bitcpm_script if installed else bitcpm_in_process)(*args, "-o", output)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: ") and "Traceback" not in result.stderr
    assert len([line for line in result.stderr.splitlines() if line.startswith("error:")]) == 1
    assert not output.exists() and result.stdout == ""
    return result.stderr


def test_refusals_are_exit_2_with_one_error_line_and_nothing_written(a8, gguf_file, tmp_path):
    stderr = refused("infer", "-m", a8 / "fused", "-p", PROMPT, "--activations", "bogus", output=tmp_path / "r.json",
                     installed=True)
    assert "--activations 'bogus' is not one of none, int8-token, q8_k, q8_0" in stderr
    broken = tmp_path / "broken"
    shutil.copytree(a8 / "fused", broken)
    config = json.loads((broken / "config.json").read_text())
    config["bitcpm_activations"]["q8_k"].append("model.layers.0.mlp.missing")
    (broken / "config.json").write_text(json.dumps(config))
    before = (broken / "config.json").read_bytes()
    stderr = refused("infer", "-m", broken, "-p", PROMPT, output=tmp_path / "r.json")
    assert "'model.layers.0.mlp.missing' is not a linear layer of this checkpoint" in stderr
    assert "bitcpm_activations" in stderr
    assert (broken / "config.json").read_bytes() == before
    stderr = refused("infer", "--engine", "llama.cpp", "-m", gguf_file, "-p", PROMPT, "--activations", "q8_k",
                     output=tmp_path / "r.json")
    assert "the llama.cpp engine cannot change the activation scheme" in stderr and "TQ1_0 / TQ2_0" in stderr
    stderr = refused("eval", "-m", a8 / "qat", "-m", broken, "--data", a8 / "t.txt", "--context", "64",
                     output=tmp_path / "r.json")
    assert "model.layers.0.mlp.missing" in stderr


@pytest.mark.parametrize("command", ["infer", "eval"])
def test_help_names_the_option(invoke, command):
    from bitcpm_cli.cli.infer import ACTIVATIONS_HELP

    result = invoke(command, "--help", env={"COLUMNS": "300"})
    assert result.exit_code == 0 and "--activations" in result.output
    assert " ".join(ACTIVATIONS_HELP.split()[:8]) in " ".join(result.output.split())
