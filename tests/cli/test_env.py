import json

import torch


def test_help(invoke):
    result = invoke("env", "--help")
    assert result.exit_code == 0
    assert "--json" in result.output and "--device" in result.output


def test_env_table_on_cpu(invoke, cpu_machine):
    result = invoke("env")
    assert result.exit_code == 0, result.output
    assert "selected device" in result.output and "no problems found" in result.output


def test_env_json_on_cpu(invoke, cpu_machine):
    result = invoke("env", "--json")
    assert result.exit_code == 0
    report = json.loads(result.stdout)
    assert report["selected"] == "cpu"
    assert report["packages"]["torch"].split("+")[0] == torch.__version__.split("+")[0]
    assert report["diagnoses"] == []


def test_env_diagnoses_hidden_npus(invoke, fake_npu, monkeypatch):
    fake_npu(available=True, count=0)
    monkeypatch.setenv("ASCEND_RT_VISIBLE_DEVICES", "4")
    result = invoke("env", "--json")
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert report["variables"]["ASCEND_RT_VISIBLE_DEVICES"] == "4"
    assert report["selected"] is None
    assert any("ASCEND_RT_VISIBLE_DEVICES=4 hides every NPU" in d["message"] for d in report["diagnoses"])
    table = invoke("env")
    assert table.exit_code == 1 and "unset ASCEND_RT_VISIBLE_DEVICES" in table.output
    assert table.stderr.startswith("error: ASCEND_RT_VISIBLE_DEVICES=4 hides every NPU")  # the verdict, after the report


def test_env_reports_torch_import_failure(invoke, fake_npu, monkeypatch):
    import sys

    fake_npu()
    monkeypatch.setitem(sys.modules, "torch", None)
    result = invoke("env", "--json")
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert "CANN is not usable" in report["diagnoses"][0]["message"]


def test_env_bad_device_is_exit_2(invoke):
    result = invoke("env", "--device", "gpu7")
    assert result.exit_code == 2 and "error: unknown device" in result.stderr
