import json

import pytest

from bitcpm_cli.core.evaluation.compare import compare_results, load_results
from bitcpm_cli.core.errors import InputError


def doc(results, temperature=0.0, fingerprint="sha256:aa"):
    return {"schema": "bitcpm.results/1", "model": {"fingerprint": fingerprint, "dtype": "bfloat16"},
            "runtime": {"device": "cpu", "device_name": "x86"}, "sampling": {"temperature": temperature, "seed": 42},
            "results": results}


def entry(pid, tokens, prompt=None, logprobs=None):
    out = {"id": pid, "prompt": prompt if prompt is not None else f"prompt {pid}", "token_ids": tokens}
    if logprobs is not None:
        out["top_logprobs"] = logprobs
    return out


def write(tmp_path, name, data):
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def test_identical_files_match(tmp_path):
    a = write(tmp_path, "a.json", doc([entry(0, [5, 6, 7]), entry(1, [8, 9])]))
    report = compare_results(a, a)
    assert report.ok and report.matched_by == "prompt text"
    assert [(p.compared, p.matched, p.status) for p in report.prompts] == [(3, 3, "match"), (2, 2, "match")]


def test_flipped_token_found_at_its_index(tmp_path):
    a = write(tmp_path, "a.json", doc([entry(0, [5, 6, 7, 8, 9])]))
    b = write(tmp_path, "b.json", doc([entry(0, [5, 6, 70, 8, 9])]))
    report = compare_results(a, b)
    p = report.prompts[0]
    assert not report.ok and p.status == "diverged"
    assert (p.divergence, p.matched, p.token_a, p.token_b) == (2, 2, 7, 70)
    assert "--logprobs" in p.explanation


def test_max_tokens_bounds_the_comparison(tmp_path):
    a = write(tmp_path, "a.json", doc([entry(0, [1, 2, 3, 4])]))
    b = write(tmp_path, "b.json", doc([entry(0, [1, 2, 3, 99])]))
    assert compare_results(a, b, max_tokens=3).ok
    assert compare_results(a, b, max_tokens=3).prompts[0].compared == 3
    assert not compare_results(a, b, max_tokens=4).ok


def test_bare_list_format_from_the_adaptation_report(tmp_path):
    npu = write(tmp_path, "npu_results.json", [{"token_ids": [1, 2, 3]}, {"token_ids": [4, 5]}])
    cpu = write(tmp_path, "cpu.json", doc([entry(0, [1, 2, 3], prompt="Hello"), entry(1, [4, 6], prompt="Paris")]))
    loaded = load_results(npu)
    assert loaded.meta == {} and [e.id for e in loaded.entries] == [0, 1]
    report = compare_results(npu, cpu)
    assert report.matched_by == "id"
    assert [p.status for p in report.prompts] == ["match", "diverged"]


def lp(top1, lp1, top2, lp2):
    return [[top1, lp1], [top2, lp2]]


def test_near_tie_flip_is_told_apart_from_a_real_divergence(tmp_path):
    same = lp(5, -0.1, 9, -3.0)
    a = write(tmp_path, "a.json", doc([entry(0, [5, 7], logprobs=[same, lp(7, -0.70, 8, -0.72)])]))
    b = write(tmp_path, "b.json", doc([entry(0, [5, 8], logprobs=[lp(5, -0.12, 9, -3.1), lp(8, -0.70, 7, -0.71)])]))
    report = compare_results(a, b)
    p = report.prompts[0]
    assert p.status == "near-tie" and p.divergence == 1
    assert p.margin_a == pytest.approx(0.02) and p.margin_b == pytest.approx(0.01)
    assert p.max_logprob_diff == pytest.approx(0.02) and p.max_logprob_diff_at == 0
    assert not report.ok  # near ties count as mismatches unless allowed
    assert compare_results(a, b, allow_near_ties=True).ok
    assert compare_results(a, b, tie_margin=0.005).prompts[0].status == "diverged"
    clear = write(tmp_path, "c.json", doc([entry(0, [5, 8], logprobs=[same, lp(8, -0.1, 7, -2.5)])]))
    real = compare_results(a, clear).prompts[0]
    assert real.status == "diverged" and "real divergence" in real.explanation


def test_different_prompts_and_settings_are_reported(tmp_path):
    a = write(tmp_path, "a.json", doc([entry(0, [1], prompt="x"), entry(1, [2], prompt="y")]))
    b = write(tmp_path, "b.json", doc([entry(0, [1], prompt="x"), entry(1, [3], prompt="z")], temperature=0.7,
                                      fingerprint="sha256:bb"))
    report = compare_results(a, b)
    notes = "\n".join(report.notes)
    assert "1 only in A, 1 only in B" in notes
    assert "temperature is 0.0 in A and 0.7 in B" in notes and "not decoded greedily" in notes
    assert "different weights" in notes
    assert {p.status for p in report.prompts} == {"match", "only-in-a", "only-in-b"}


def test_one_run_stopping_early(tmp_path):
    a = write(tmp_path, "a.json", doc([entry(0, [1, 2])]))
    b = write(tmp_path, "b.json", doc([entry(0, [1, 2, 3])]))
    p = compare_results(a, b).prompts[0]
    assert p.divergence == 2 and p.token_a is None and "A stopped" in p.explanation


@pytest.mark.parametrize("content,message", [
    (None, "results file not found"),
    ("{not json", "not valid JSON"),
    ('{"schema": "bitcpm.results/1", "results": [{"ids": [1]}]}', r"results\[0\]\.token_ids"),
    ('{"schema": "bitcpm.results/9", "results": [{"token_ids": [1]}]}', "is not 'bitcpm.results/1'"),
    ('{"results": [{"token_ids": [1]}]}', "schema: missing"),
    ('{"hello": 1}', "neither a results document"),
    ("[]", "holds no results"),
])
def test_bad_input(tmp_path, content, message):
    path = tmp_path / "x.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(InputError, match=message):
        load_results(path)
