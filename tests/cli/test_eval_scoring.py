"""`bitcpm eval --scoring`, `--per-token` and the gates' numbers (issue 23 items 9 and 16): what is refused (exit 2,
one error line, nothing written, before any model loads) and what the per-token file holds."""

import json
import math
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.helpers import bitcpm_script, build_tiny_model

TEXT = "the quick brown fox jumps over the lazy dog\n1 2 3 4 5, and 6!\nHello: is it me you're looking for?\n"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("scoring")
    build_tiny_model(root / "qat", kind="qat")
    build_tiny_model(root / "float", kind="float", seed=1)
    (root / "t.txt").write_text(TEXT)
    (root / "t.jsonl").write_text(json.dumps({"text": TEXT}) + "\n")
    (root / "empty-a").mkdir()  # folders that exist but hold no model: anything that loads them fails
    (root / "empty-b").mkdir()
    return root


def refused(invoke, tmp_path, *args, start: str) -> str:
    result = invoke("eval", *args, "-o", tmp_path / "r.json")
    assert result.exit_code == 2, result.output
    lines = result.stderr.splitlines()
    assert lines[0].startswith(f"error: {start}") and lines[-1].startswith("hint: "), result.stderr
    assert sum(line.startswith("error:") for line in lines) == 1 and "Traceback" not in result.output
    assert not (tmp_path / "r.json").exists()
    return result.stderr


def test_max_kld_nan_is_exit_2_before_anything_loads_through_the_installed_script(models, tmp_path):
    run = bitcpm_script("eval", "-m", models / "empty-a", "-m", models / "empty-b", "--data", models / "t.txt",
                        "--max-kld", "nan", "-o", tmp_path / "r.json")
    lines = run.stderr.splitlines()
    assert run.returncode == 2 and lines[0] == "error: --max-kld nan: need a finite number >= 0 (a mean KLD in nats)"
    assert lines[-1].startswith("hint: ") and "Traceback" not in run.stderr and run.stdout == ""
    assert not (tmp_path / "r.json").exists()


@pytest.mark.parametrize("option,value", [("--max-kld", "inf"), ("--max-kld", "-1"), ("--max-kld", "-inf"),
                                          ("--min-top1", "nan"), ("--min-top1", "-1"), ("--min-top1", "inf"),
                                          ("--min-top1", "100.5")])
def test_a_gate_that_can_never_fire_or_means_nothing_is_refused(models, invoke, tmp_path, option, value):
    # the models are empty folders: the refusal comes before any of them is read
    refused(invoke, tmp_path, "-m", models / "empty-a", "-m", models / "empty-b", "--data", models / "t.txt",
            option, value, start=f"{option} {float(value)}")


def test_scoring_settings_llamacpp_cannot_honour_are_refused(models, invoke, tmp_path):
    base = ["-m", models / "qat", "--device", "cpu"]
    refused(invoke, tmp_path, *base, "--data", models / "t.txt", "--scoring", "lm-eval", start="--scoring 'lm-eval'")
    refused(invoke, tmp_path, *base, "--data", models / "t.jsonl", "--scoring", "llama.cpp",
            start="--scoring llama.cpp reads --data as one plain text file")
    refused(invoke, tmp_path, *base, "--data", models / "t.txt", "--scoring", "llama.cpp", "--stride", "4",
            start="--stride is for --scoring windows")
    refused(invoke, tmp_path, *base, "--data", models / "t.txt", "--scoring", "llama.cpp", "--context", "2",
            start="--context 2")
    refused(invoke, tmp_path, *base, "--data", models / "t.txt", "--scoring", "llama.cpp", "--context", "128",
            start="--scoring llama.cpp needs at least 256 tokens with --context 128")


def test_per_token_file_refusals(models, invoke, tmp_path):
    base = ["-m", models / "qat", "--data", models / "t.txt", "--context", "32", "--device", "cpu"]
    result = invoke("eval", *base, "-o", tmp_path / "same.json", "--per-token", tmp_path / "same.json")
    assert result.exit_code == 2 and result.stderr.startswith("error: --per-token and --output name the same file")
    (tmp_path / "old.jsonl").write_text("keep\n")
    result = invoke("eval", *base, "--per-token", tmp_path / "old.jsonl")
    assert result.exit_code == 2 and result.stderr.startswith("error: --per-token already exists")
    assert (tmp_path / "old.jsonl").read_text() == "keep\n"
    result = invoke("eval", *base, "--per-token", models / "t.txt")
    assert result.exit_code == 2 and result.stderr.startswith("error: --per-token is the input")
    assert (models / "t.txt").read_text() == TEXT
    if os.path.exists("/dev/null"):
        result = invoke("eval", *base, "--per-token", "/dev/null", "--overwrite")
        assert result.exit_code == 2 and "not a regular file" in result.stderr


def test_per_token_file_lines_up_with_the_report(models, invoke, tmp_path):
    result = invoke("eval", "-m", models / "qat", "-m", models / "float", "--data", models / "t.txt", "--context",
                    "16", "--stride", "8", "--device", "cpu", "--per-token", tmp_path / "t.jsonl", "-o",
                    tmp_path / "r.json")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r.json").read_text())
    lines = [json.loads(line) for line in (tmp_path / "t.jsonl").read_text().splitlines()]
    header, rows = lines[0], lines[1:]
    assert header["schema"] == "bitcpm.eval.tokens/1" and header["scoring"] == "windows"
    assert header["models"] == [str(models / "qat"), str(models / "float")] and header["add_bos"] is False
    assert len(rows) == header["scored_tokens"] == report["data"]["scored_tokens"] == report["data"]["tokens"] - 1
    assert [r["i"] for r in rows] == list(range(len(rows)))
    assert [r["position"] for r in rows] == list(range(1, len(rows) + 1))  # windows score every token but the first
    assert rows[0]["chunk"] == 0 and rows[-1]["chunk"] == max(r["chunk"] for r in rows) > 0
    for index, entry in enumerate(report["models"]):
        mean = math.fsum(r["nll"][index] for r in rows) / len(rows)
        assert mean == pytest.approx(entry["mean_nll"], rel=1e-12)
    versus = report["models"][1]["vs_reference"]
    assert all(r["kld"][0] is None and r["same_top"][0] is None for r in rows)
    assert math.fsum(r["kld"][1] for r in rows) / len(rows) == pytest.approx(versus["mean_kld"], rel=1e-5)
    assert 100 * sum(r["same_top"][1] for r in rows) / len(rows) == pytest.approx(versus["same_top_pct"])
    assert report["settings"]["per_token"] == str(tmp_path / "t.jsonl")


def test_per_token_file_of_one_model_has_nll_only(models, invoke, tmp_path):
    result = invoke("eval", "-m", models / "qat", "--data", models / "t.txt", "--context", "32", "--device", "cpu",
                    "--per-token", tmp_path / "t.jsonl", "--json")
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (tmp_path / "t.jsonl").read_text().splitlines()[1:]]
    assert rows and all(set(r) == {"i", "chunk", "position", "token", "nll"} and len(r["nll"]) == 1 for r in rows)
    assert json.loads(result.stdout)["settings"]["scoring"] == "windows"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".bitcpm-")]  # no claim or staging left


# ---- hostile numbers and chunkings (hypothesis) --------------------------------------------------------------
numbers = st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from([0.0, -0.0, 100.0, 1e-300, -1e-300])


@settings(max_examples=200, deadline=None)
@given(max_kld=st.none() | numbers, min_top1=st.none() | numbers)
def test_gates_accept_exactly_the_numbers_that_mean_something(max_kld, min_top1):
    from bitcpm_cli.core.evaluation.perplexity import _gate_problems

    problems = _gate_problems(max_kld, min_top1, models=2)
    kld_ok = max_kld is None or (math.isfinite(max_kld) and max_kld >= 0)
    top_ok = min_top1 is None or (math.isfinite(min_top1) and 0 <= min_top1 <= 100)
    assert any(p.startswith("--max-kld") for p in problems) is not kld_ok
    assert any(p.startswith("--min-top1") for p in problems) is not top_ok


@settings(max_examples=200, deadline=None)
@given(n=st.integers(0, 400), context=st.integers(3, 64), bos=st.none() | st.integers(0, 9))
def test_llamacpp_chunks_are_perplexity_cpps(n, context, bos):
    import numpy as np

    from bitcpm_cli.core.evaluation.scoring import llamacpp_segments, scored_positions

    ids = np.arange(100, 100 + n, dtype=np.int32)
    first, scored = context // 2, []
    for chunk, segment in enumerate(llamacpp_segments(ids, context, bos)):
        start = chunk * context
        assert segment.chunk == chunk and len(segment.inputs) == context
        assert segment.inputs[0] == (ids[start] if bos is None else bos)
        assert list(segment.inputs[1:]) == list(ids[start + 1:start + context])
        assert (segment.row0, segment.row1) == (first, context - 1)
        assert list(segment.targets) == list(ids[start + first + 1:start + context])
        scored += range(segment.position, segment.position + len(segment.targets))
    assert len(scored) == scored_positions(n, "llama.cpp", context) == (n // context) * (context - 1 - first)
    assert n == 0 or ids[0] == 100  # the corpus keeps its tokens: BOS goes into a copy
