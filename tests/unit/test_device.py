import sys

import pytest
import torch

from bitcpm_cli.core.errors import DeviceError
from bitcpm_cli.core.runtime import device as dev
from bitcpm_cli.core.runtime import environment


def test_cpu_and_auto_on_a_cpu_machine(cpu_machine):
    assert dev.resolve_device("cpu") == torch.device("cpu")
    assert dev.resolve_device("auto") == torch.device("cpu")
    assert dev.distributed_backend(torch.device("cpu")) == "gloo"


@pytest.mark.parametrize("bad,message", [
    ("gpux", "unknown device 'gpux'"), ("tpu", "unknown device 'tpu'"),
    ("npu:x", "'x' is not a device index"), ("cpu:1", "cpu takes no index"),
])
def test_bad_device_strings(bad, message):
    with pytest.raises(DeviceError, match=message):
        dev.resolve_device(bad)


def test_explicit_cuda_missing_is_an_error_not_a_fallback():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(DeviceError) as info:
        dev.resolve_device("cuda")
    assert "CUDA is not available" in info.value.message
    assert "--device cpu" in info.value.hint


def test_explicit_npu_without_torch_npu():
    with pytest.raises(DeviceError, match="torch_npu is not installed"):
        dev.resolve_device("npu")


def test_stand_in_npu_is_chosen_by_auto_with_hccl(fake_npu):
    fake_npu(available=True, count=2)
    device = dev.resolve_device("auto")
    assert device == torch.device("npu", 0)
    assert dev.resolve_device("npu:1") == torch.device("npu", 1)
    assert dev.distributed_backend(device) == "hccl"
    assert dev.distributed_backend(torch.device("cuda", 0)) == "nccl"
    with pytest.raises(DeviceError, match="npu:2 requested but only 2"):
        dev.resolve_device("npu:2")


def test_local_rank_picks_the_npu(fake_npu, monkeypatch):
    fake_npu(available=True, count=2)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert dev.resolve_device("auto") == torch.device("npu", 1)


def test_ascend_visible_devices_hides_every_npu(fake_npu, monkeypatch):
    fake_npu(available=True, count=0)
    monkeypatch.setenv("ASCEND_RT_VISIBLE_DEVICES", "4")
    for requested in ("npu", "auto"):
        with pytest.raises(DeviceError) as info:
            dev.resolve_device(requested)
        assert "ASCEND_RT_VISIBLE_DEVICES=4" in info.value.message
        assert "unset ASCEND_RT_VISIBLE_DEVICES" in info.value.hint
    assert "--device cpu" in info.value.hint  # auto says how to run on the CPU on purpose


def test_npu_count_zero_without_the_variable(fake_npu):
    fake_npu(available=True, count=0)
    probe = dev.probe_npu()
    assert not probe.usable
    assert "device_count() is 0" in probe.diagnoses[0].message


def test_torch_npu_version_mismatch_is_diagnosed(fake_npu):
    fake_npu(version="2.1.0.post3")
    messages = [d.message for d in dev.probe_npu().diagnoses]
    assert any("torch_npu 2.1.0.post3 does not match torch" in m for m in messages)


def test_torch_import_failure_with_torch_npu_present_names_cann(fake_npu, monkeypatch):
    fake_npu()
    monkeypatch.delenv("TORCH_DEVICE_BACKEND_AUTOLOAD", raising=False)
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    with pytest.raises(DeviceError) as info:
        dev.import_torch()
    assert "torch_npu is installed but CANN is not usable" in info.value.message
    assert "TORCH_DEVICE_BACKEND_AUTOLOAD=0" in info.value.hint and "set_env.sh" in info.value.hint


def test_torch_npu_import_failure_is_diagnosed(monkeypatch, tmp_path):
    package = tmp_path / "torch_npu"
    package.mkdir()
    (package / "__init__.py").write_text("raise ImportError('libhccl.so: cannot open shared object file')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "torch_npu", raising=False)
    probe = dev.probe_npu()
    assert probe.installed and not probe.usable
    assert "libhccl.so" in probe.diagnoses[0].message
    with pytest.raises(DeviceError, match="no usable NPU"):
        dev.resolve_device("auto")


def test_cann_version_from_toolkit(monkeypatch, tmp_path):
    arch = tmp_path / "aarch64-linux"
    arch.mkdir()
    (arch / "ascend_toolkit_install.info").write_text("package_name=Ascend-cann-toolkit\nversion=8.5.1\n")
    monkeypatch.setenv("ASCEND_TOOLKIT_HOME", str(tmp_path))
    assert dev.cann_version() == "8.5.1"


def test_environment_report_on_cpu(cpu_machine):
    report = environment.collect_environment()
    assert report["selected"] == "cpu"
    assert report["packages"]["torch"].split("+")[0] == torch.__version__.split("+")[0]  # a wheel's metadata may
    assert report["devices"][0]["device"] == "cpu"                                       # omit the +cu130 tag
    assert not [d for d in report["diagnoses"] if d["level"] == "error"]


def test_environment_report_lists_stand_in_npus(fake_npu, cpu_machine):
    fake_npu(available=True, count=2)
    report = environment.collect_environment()
    assert report["selected"] == "npu:0"
    assert report["distributed_backend"] == "hccl"
    assert [d["device"] for d in report["devices"]] == ["cpu", "npu:0", "npu:1"]
    assert report["devices"][1]["memory_bytes"] == 64 * 2**30
