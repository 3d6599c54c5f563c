"""bitcpm eval's bookkeeping and statistics, checked against independent computations."""

import math

import numpy as np
import pytest
import torch

from bitcpm_cli.core.evaluation.perplexity import (
    mean_and_uncertainty,
    plan_eval,
    run_eval,
    vocabulary_mismatch,
    windows,
)
from tests.helpers import build_tiny_model


@pytest.mark.parametrize("n,context,stride", [(2, 2, 1), (10, 4, 1), (10, 4, 3), (100, 16, 8), (101, 16, 15),
                                              (5, 512, 256), (1000, 64, 63)])
def test_every_token_after_the_first_is_scored_exactly_once(n, context, stride):
    scored = []
    previous_end = 0
    for begin, end, first in windows(n, context, stride):
        assert 0 <= begin < first <= end <= n and end - begin <= context
        assert end > previous_end
        if begin > 0:  # after the first window every scored token has at least context - stride tokens before it
            assert first - begin >= context - stride
        scored += range(first, end)
        previous_end = end
    assert scored == list(range(1, n))


def test_a_stride_as_long_as_the_context_is_refused():
    with pytest.raises(ValueError):
        list(windows(10, 4, 4))


def test_mean_and_uncertainty_is_the_standard_error():
    values = np.random.default_rng(0).normal(3, 2, size=1000)
    mean, unc = mean_and_uncertainty(values.sum(), (values ** 2).sum(), len(values))
    assert mean == pytest.approx(values.mean()) and unc == pytest.approx(values.std(ddof=0) / math.sqrt(999))
    assert mean_and_uncertainty(5.0, 25.0, 5) == (1.0, 0.0)  # too few values for an uncertainty, as llama.cpp


def test_vocabulary_mismatch_names_the_first_differing_token():
    assert vocabulary_mismatch(["a", "b", None], ["a", "b", "x"]) is None
    assert vocabulary_mismatch(["a", "b", "c"], ["a", "B", "C"]) == "token 1 is 'b' in the reference, 'B' here"
    assert "3 logits a position" in vocabulary_mismatch(["a", "b"], ["a", "b", "c"])


@pytest.fixture(scope="module")
def float_model(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("float") / "m", kind="float", seed=3)


def test_perplexity_is_exp_of_the_mean_nll_computed_independently(float_model, tmp_path):
    from transformers import AutoTokenizer, LlamaForCausalLM

    text = ["the quick brown fox jumps over the lazy dog", "1 2 3 4 5, and 6!"]
    (tmp_path / "t.txt").write_text("\n".join(text) + "\n")
    report = run_eval(plan_eval([float_model], tmp_path / "t.txt", context=128, device="cpu"))
    tokenizer = AutoTokenizer.from_pretrained(float_model)
    ids = []
    assert tokenizer("x")["input_ids"][0] != tokenizer.bos_token_id  # this tokenizer adds no BOS: eval adds none
    for line in text:
        ids += tokenizer(line, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    model = LlamaForCausalLM.from_pretrained(float_model, dtype=torch.float32).eval()
    assert len(ids) <= 128  # one window: every token sees all tokens before it
    with torch.no_grad():  # token by token, each from the tokens before it
        nll = [float(-torch.log_softmax(model(torch.tensor([ids[:t]])).logits[0, -1], -1)[ids[t]])
               for t in range(1, len(ids))]
    entry = report["models"][0]
    assert report["data"]["tokens"] == len(ids) and entry["tokens"] == len(ids) - 1
    assert entry["mean_nll"] == pytest.approx(sum(nll) / len(nll), rel=1e-5)
    assert entry["ppl"] == pytest.approx(math.exp(entry["mean_nll"]), rel=1e-12)
    low, high = entry["ppl_95"]
    assert low < entry["ppl"] < high
    assert "vs_reference" not in entry
