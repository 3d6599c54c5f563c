"""Item 15: a model `bitcpm train` wrote tokenizes a plain prompt as training did (BOS first) in stock transformers,
in bitcpm's engines and in the GGUF converted from it; a model bitcpm did not train keeps its tokenizer's behaviour.
Item 16: `eval --scoring llama.cpp` reproduces llama-perplexity's default chunking, checked against an independent
reimplementation of tools/perplexity/perplexity.cpp's `perplexity()` loop (llama-perplexity itself is not built here:
see the module docstring of core/evaluation/scoring.py for the rules it follows), for a GGUF file through
llama-cpp-python's logits and for a transformers model by hand."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("gguf", reason="GGUF tests need the gguf extra: pip install -e '.[gguf]'")
llama_cpp = pytest.importorskip("llama_cpp", reason="llama.cpp tests need llama-cpp-python (the gguf extra)")

from bitcpm_cli.core.conversion.gguf.export import export_gguf  # noqa: E402
from bitcpm_cli.core.engines.hf import HFEngine  # noqa: E402
from bitcpm_cli.core.engines.llamacpp import LlamaCppEngine  # noqa: E402
from bitcpm_cli.core.training.recipe import TrainConfig, resolve_config  # noqa: E402
from bitcpm_cli.core.training.train import train  # noqa: E402
from tests.helpers import build_tiny_model  # noqa: E402
from tests.integration.test_gguf import TOKENIZER, qat_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
CONTEXT = 32


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """base/ (a QAT model bitcpm did not train, with the quickstart tokenizer: no BOS), run/final (`bitcpm train`, 2
    steps from a float model with that tokenizer), both also as GGUF files; a held-out text of a few hundred tokens."""
    root = tmp_path_factory.mktemp("bos")
    build_tiny_model(root / "float", kind="float", tokenizer=TOKENIZER, config={
        "vocab_size": 512, "hidden_size": 256, "intermediate_size": 512, "head_dim": 64, "max_position_embeddings": 256})
    qat_model(root / "base", group_size=-1)
    lines = (TOKENIZER.parent / "corpus.txt").read_text().splitlines()
    (root / "train.txt").write_text("\n".join(lines[:200]) + "\n")
    (root / "held.txt").write_text("\n".join(lines[200:230]) + "\n")
    config = resolve_config(TrainConfig, ROOT / "configs" / "quickstart" / "train.yaml",
                            {"model": str(root / "float"), "data": [str(root / "train.txt")],
                             "output_dir": str(root / "run")}, ["max_steps=2", "save_steps=2", "batch_size=2"])
    train(config)
    export_gguf(root / "run" / "final", root / "final.gguf")
    export_gguf(root / "base", root / "base.gguf")
    return root


def vocab_only(path: Path):
    return llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)


def gguf_add_bos(path: Path) -> bool:
    from gguf import GGUFReader

    field = GGUFReader(path).fields["tokenizer.ggml.add_bos_token"]
    return bool(field.parts[field.data[0]][0])


# ---- item 15: BOS as training put it -------------------------------------------------------------------------
def test_a_trained_model_adds_bos_in_transformers_llamacpp_and_the_engines(models):
    from transformers import AutoTokenizer

    final = models / "run" / "final"
    tokenizer = AutoTokenizer.from_pretrained(final)
    ids = tokenizer("hello")["input_ids"]
    plain = tokenizer("hello", add_special_tokens=False)["input_ids"]
    assert ids == [tokenizer.bos_token_id] + plain  # stock transformers: BOS first, as every training document
    assert json.loads((final / "tokenizer_config.json").read_text())["add_bos_token"] is True
    assert gguf_add_bos(models / "final.gguf")
    llm = vocab_only(models / "final.gguf")
    assert llm.tokenize(b"hello", add_bos=True, special=False) == ids  # llama.cpp honours the GGUF's add_bos
    assert HFEngine().card(final).add_bos and LlamaCppEngine().card(models / "final.gguf").add_bos


def test_a_model_bitcpm_did_not_train_keeps_its_tokenizers_behaviour(models):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(models / "base")
    assert tokenizer("hello")["input_ids"] == tokenizer("hello", add_special_tokens=False)["input_ids"]
    assert "add_bos_token" not in json.loads((models / "base" / "tokenizer_config.json").read_text())
    assert not gguf_add_bos(models / "base.gguf")
    llm = vocab_only(models / "base.gguf")
    assert llm.tokenize(b"hello", add_bos=True, special=False) == tokenizer("hello")["input_ids"]
    assert not HFEngine().card(models / "base").add_bos and not LlamaCppEngine().card(models / "base.gguf").add_bos


def test_eval_scores_with_bos_only_where_the_tokenizer_adds_it(models, invoke, tmp_path):
    from transformers import AutoTokenizer

    held = models / "held.txt"
    documents = [line for line in held.read_text().splitlines() if line.strip()]
    for model, bos in ((models / "run" / "final", True), (models / "base", False)):
        result = invoke("eval", "-m", model, "--data", held, "--context", "64", "--device", "cpu", "--json")
        assert result.exit_code == 0, result.output
        data = json.loads(result.stdout)["data"]
        tokenizer = AutoTokenizer.from_pretrained(model)
        expected = sum(len(tokenizer(d, add_special_tokens=False)["input_ids"]) + 1 + bos for d in documents)
        assert data["add_bos"] is bos and data["tokens"] == expected


def saved_tokenizer(folder: Path, post_processor, bos: str | None = "<s>"):
    """A byte-level BPE tokenizer with the given post-processor, saved as transformers saves it; loaded back."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers
    from tokenizers import models as tok_models
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>"] + list("abcdefghijklmnopqrstuvwxyzĠ"))}
    core = Tokenizer(tok_models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    if post_processor is not None:
        core.post_processor = post_processor
    PreTrainedTokenizerFast(tokenizer_object=core, bos_token=bos, eos_token="</s>", unk_token="<unk>").save_pretrained(
        folder)
    return AutoTokenizer.from_pretrained(folder)


def test_bos_is_added_whatever_the_post_processor_and_nothing_else_changes(tmp_path):
    from tokenizers import processors
    from transformers import AutoTokenizer

    from bitcpm_cli.core.model.tokenizer_bos import prepend_bos_like_training

    cases = {"bytelevel": processors.ByteLevel(trim_offsets=False),
             "eos": processors.TemplateProcessing(single="$A </s>", pair="$A $B:1 </s>:1", special_tokens=[("</s>", 2)]),
             "none": None}
    for name, post in cases.items():
        before = saved_tokenizer(tmp_path / name, post)
        plain = before("hello world", add_special_tokens=False)["input_ids"]
        assert before("hello world")["input_ids"][:1] != [1]
        notes = prepend_bos_like_training(tmp_path / name, before)
        after = AutoTokenizer.from_pretrained(tmp_path / name)
        assert after("hello world")["input_ids"] == [1] + before("hello world")["input_ids"], name
        assert after("hello world", add_special_tokens=False)["input_ids"] == plain and "now adds BOS" in notes[0]
        config = json.loads((tmp_path / name / "tokenizer_config.json").read_text())
        assert config["add_bos_token"] is True and config["add_eos_token"] is (name == "eos")
    files = {p.name: p.read_bytes() for p in (tmp_path / "eos").iterdir()}
    assert prepend_bos_like_training(tmp_path / "eos", AutoTokenizer.from_pretrained(tmp_path / "eos")) == []
    assert {p.name: p.read_bytes() for p in (tmp_path / "eos").iterdir()} == files  # adds BOS already: untouched
    no_bos = saved_tokenizer(tmp_path / "nobos", None, bos=None)
    files = {p.name: p.read_bytes() for p in (tmp_path / "nobos").iterdir()}
    assert prepend_bos_like_training(tmp_path / "nobos", no_bos) == []
    assert {p.name: p.read_bytes() for p in (tmp_path / "nobos").iterdir()} == files  # no BOS token: untouched


# ---- item 16: llama-perplexity's chunks ------------------------------------------------------------------------
def perplexity_cpp(tokens: list[int], logits_of, n_ctx: int, add_bos: bool, bos: int) -> dict:
    """tools/perplexity/perplexity.cpp `perplexity()`, its default path, written out again: n_chunk = n_tokens / n_ctx,
    BOS replacing each chunk's first token, logits of positions first .. n_ctx - 2 (first = n_ctx / 2) scoring the
    token after each, NLL = max + log(sum exp(l - max)) - l[tok] (the sum in double), the final estimate as printed."""
    assert len(tokens) >= 2 * n_ctx
    first = n_ctx // 2
    nll = nll2 = 0.0
    count = 0
    values, positions, running = [], [], []
    for i in range(len(tokens) // n_ctx):
        start = i * n_ctx
        chunk = list(tokens[start:start + n_ctx])
        if add_bos:
            chunk[0] = bos
        logits = np.asarray(logits_of(chunk), dtype=np.float32)
        for j in range(first, n_ctx - 1):
            row, tok = logits[j], tokens[start + j + 1]
            top = float(row.max())
            v = top + math.log(float(np.exp((row - top).astype(np.float32)).astype(np.float64).sum())) - float(row[tok])
            nll, nll2, count = nll + v, nll2 + v * v, count + 1
            values.append(v)
            positions.append(start + j + 1)
        running.append(math.exp(nll / count))
    mean, mean2 = nll / count, nll2 / count
    ppl = math.exp(mean)
    unc = ppl * math.sqrt((mean2 - mean * mean) / (count - 1))
    return {"values": values, "positions": positions, "ppl": ppl, "unc": unc, "running": running,
            "line": f"Final estimate: PPL = {ppl:.4f} +/- {unc:.5f}"}


def read_per_token(path: Path) -> tuple[dict, list[dict]]:
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    return lines[0], lines[1:]


def check_against(report: dict, header: dict, rows: list[dict], expected: dict, tokens: list[int], model: int = 0):
    entry = report["models"][model]
    assert report["settings"]["scoring"] == "llama.cpp" and report["data"]["tokens"] == len(tokens)
    assert entry["tokens"] == len(expected["values"]) == len(rows) == header["scored_tokens"]
    assert [r["position"] for r in rows] == expected["positions"]
    assert [r["token"] for r in rows] == [tokens[p] for p in expected["positions"]]
    got = np.array([r["nll"][model] for r in rows])
    assert np.abs(got - np.array(expected["values"])).max() < 1e-4
    assert abs(entry["mean_nll"] - math.log(expected["ppl"])) < 1e-5  # ln PPL within 1e-5
    estimate = entry["llama_cpp"]
    assert estimate["ppl"] == pytest.approx(expected["ppl"], rel=1e-5)
    assert estimate["ppl_unc"] == pytest.approx(expected["unc"], rel=1e-3)
    assert estimate["chunks"] == len(expected["running"]) == len(tokens) // CONTEXT
    assert np.allclose(estimate["running_ppl"], expected["running"], rtol=1e-5)
    assert estimate["final_estimate"].startswith("Final estimate: PPL = ")


def test_llamacpp_scoring_of_a_gguf_matches_perplexity_cpp(models, invoke, tmp_path):
    gguf = models / "final.gguf"
    result = invoke("eval", "-m", gguf, "--data", models / "held.txt", "--scoring", "llama.cpp", "--context",
                    str(CONTEXT), "--per-token", tmp_path / "tokens.jsonl", "-o", tmp_path / "r.json")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r.json").read_text())
    header, rows = read_per_token(tmp_path / "tokens.jsonl")
    assert header["schema"] == "bitcpm.eval.tokens/1" and header["add_bos"] is True
    text = (models / "held.txt").read_bytes()[:-1]  # llama-perplexity -f drops one trailing newline
    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=CONTEXT, n_batch=CONTEXT, logits_all=True, verbose=False)
    tokens = llm.tokenize(text, add_bos=True, special=False)  # common_tokenize(ctx, prompt, true)
    assert tokens[0] == llm.token_bos()

    def logits_of(chunk):
        llm.reset()
        llm.eval(chunk)
        return np.array(llm.scores[:len(chunk)])

    expected = perplexity_cpp(tokens, logits_of, CONTEXT, llm._model.add_bos_token(), llm.token_bos())
    check_against(report, header, rows, expected, tokens)
    assert report["models"][0]["llama_cpp"]["final_estimate"] == expected["line"]
    llm.close()


def test_llamacpp_scoring_of_a_transformers_model_matches_a_computation_by_hand(models, invoke, tmp_path):
    from transformers import AutoTokenizer, LlamaForCausalLM

    from bitcpm_cli.core.quant import QuantScheme, prepare

    final = models / "run" / "final"
    result = invoke("eval", "-m", final, "-m", models / "final.gguf", "--data", models / "held.txt", "--scoring",
                    "llama.cpp", "--context", str(CONTEXT), "--device", "cpu", "--per-token", tmp_path / "t.jsonl",
                    "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    header, rows = read_per_token(tmp_path / "t.jsonl")
    tokenizer = AutoTokenizer.from_pretrained(final)
    tokens = tokenizer((models / "held.txt").read_text()[:-1])["input_ids"]  # BOS first: the trained tokenizer's
    assert tokens[0] == tokenizer.bos_token_id
    model = LlamaForCausalLM.from_pretrained(final, dtype=torch.float32).eval()
    prepare(model, QuantScheme.from_config(json.loads((final / "config.json").read_text())))  # QAT forward

    def logits_of(chunk):
        with torch.no_grad():
            return model(torch.tensor([chunk])).logits[0].numpy()

    expected = perplexity_cpp(tokens, logits_of, CONTEXT, True, tokenizer.bos_token_id)
    check_against(report, header, rows, expected, tokens)
    gguf = report["models"][1]  # the GGUF scored the very same tokens: KLD and same-top per token are in the file
    assert gguf["tokens"] == report["models"][0]["tokens"] and header["models"][1].endswith("final.gguf")
    assert all(r["kld"][0] is None and r["kld"][1] is not None and isinstance(r["same_top"][1], bool) for r in rows)
    kld = np.array([r["kld"][1] for r in rows])
    assert kld.mean() == pytest.approx(gguf["vs_reference"]["mean_kld"], rel=1e-4)
    same = 100 * np.mean([r["same_top"][1] for r in rows])
    assert same == pytest.approx(gguf["vs_reference"]["same_top_pct"])


def test_llamacpp_scoring_refuses_a_text_shorter_than_two_chunks(models, invoke, tmp_path):
    (tmp_path / "short.txt").write_text("one two three\n")
    result = invoke("eval", "-m", models / "final.gguf", "--data", tmp_path / "short.txt", "--scoring", "llama.cpp",
                    "--context", str(CONTEXT), "-o", tmp_path / "r.json", "--per-token", tmp_path / "t.jsonl")
    assert result.exit_code == 2 and result.stderr.startswith("error: --scoring llama.cpp needs at least 64 tokens")
    assert not (tmp_path / "r.json").exists() and not (tmp_path / "t.jsonl").exists()
