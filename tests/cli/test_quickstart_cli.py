"""The quickstart's rendering: the live training line of `train`, and --json (the pipeline itself: integration)."""

import json

import bitcpm_cli.core.quickstart as core_quickstart


def fake_run(output_dir, on_stage=None, on_event=None):
    result = core_quickstart.QuickstartResult(str(output_dir))
    on_stage("train (ternary QAT)", "start")
    for step in (1, 2):
        on_event({"step": step, "max_steps": 2, "loss": 1.0 / step, "lr": 1e-3, "tokens_per_s": 100.0})
    on_stage("train (ternary QAT)", "2 steps")
    result.stages.append(("train (ternary QAT)", 1.5, "2 steps"))
    result.generations.append({"model": "m", "prompt": "p", "expected": "e", "generated": "e", "correct": True})
    return result


def test_quickstart_shows_the_training_line_and_prints_json(invoke, tmp_path, monkeypatch):
    monkeypatch.setattr(core_quickstart, "run_quickstart", fake_run)
    result = invoke("quickstart", "--output-dir", tmp_path / "qs", "--json")
    assert result.exit_code == 0, result.output
    assert "step 1/2  loss 1.0000  lr 1.00e-03  100 tok/s" in result.stderr  # as `train` shows it, off a terminal
    assert "step 0/None" not in result.stderr and "done train (ternary QAT): 2 steps" in result.stderr
    report = json.loads(result.stdout)
    assert report["correct"] is True and report["stages"] == [["train (ternary QAT)", 1.5, "2 steps"]]
    plain = invoke("quickstart", "--output-dir", tmp_path / "qs2")
    assert plain.exit_code == 0 and "quickstart passed" in plain.stdout and "held-out prompts" in plain.stdout
