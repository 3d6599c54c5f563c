"""The Python API (`from bitcpm_cli import ...`): every name resolves, and the README's examples run as written."""

import json
import subprocess
import sys

import bitcpm_cli

from tests.helpers import build_tiny_model


def test_every_api_name_resolves_and_import_stays_light():
    for name in bitcpm_cli.__all__:
        assert getattr(bitcpm_cli, name) is not None
    code = "import sys, bitcpm_cli; assert 'torch' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_readme_examples(tmp_path, monkeypatch):
    from bitcpm_cli import (SftConfig, check_config, compare_results, convert_checkpoint, fine_tune, generate,
                            plan_eval, read_chat_data, read_prompts, resolve_config, run_eval, write_json)

    monkeypatch.chdir(tmp_path)
    build_tiny_model(tmp_path / "ckpt", kind="qat")
    qat = tmp_path / "ckpt"
    # fix-config: config.json against the weight shapes
    report = check_config("ckpt")
    assert report.consistent
    # convert: fuse the quantizer (exact), folder ready for stock transformers
    result = convert_checkpoint("ckpt", "fused", fmt="fused", verify=True)
    assert result.verify.ok
    # infer + compare: the QAT checkpoint and its fused conversion give the same tokens, through the registry
    prompts = read_prompts(["Hello"], None)
    for name in ("ckpt", "fused"):
        write_json(generate(name, prompts, device="cpu", max_new_tokens=8), f"{name}.json")
    assert compare_results("ckpt.json", "fused.json").ok
    # eval: the fused (bf16) model scored against the QAT forward it came from, on the same token ids
    (tmp_path / "held-out.txt").write_text("".join(f"{n} {n + 1} {n + 2}\n" for n in range(30)))
    evaluation = run_eval(plan_eval(["ckpt", "fused"], "held-out.txt", context=64, device="cpu"))
    assert evaluation["models"][1]["vs_reference"]["same_top_pct"] >= 90
    # chat data as LLaMA-Factory reads it
    data_file = tmp_path / "chat.jsonl"
    data_file.write_text(json.dumps({"instruction": "Say hi", "input": "", "output": "hi"}) + "\n")
    assert read_chat_data([str(data_file)]).conversations[0].messages[-1] == {"role": "assistant", "content": "hi"}
    # sft: the same settings as the command's flags and recipe
    settings = resolve_config(SftConfig, None, {"model": str(qat), "data": [str(data_file)],
                                                "output_dir": str(tmp_path / "run"), "max_steps": 2,
                                                "device": "cpu", "lr": 1e-3})
    run = fine_tune(settings)
    assert run.steps == 2 and (tmp_path / "run" / "final" / "config.json").is_file()
