"""`bitcpm env`: every device, package, variable and diagnosis in one report (the device layer's view of the
machine, plus DeepSpeed's accelerator and extension builds). Never raises for a broken device stack: that is what it
diagnoses.
"""

from __future__ import annotations

import os
import platform
import time
from dataclasses import asdict
from typing import Any

from bitcpm_cli.core.errors import CheckFailed, DeviceError
from bitcpm_cli.core.runtime.device import (
    Diagnosis,
    NpuProbe,
    cann_version,
    distributed_backend,
    import_torch,
    package_version,
    parse_request,
    probe_npu,
    resolve_device,
)
from bitcpm_cli.core.runtime.extensions import extension_locks, extensions_dir, is_stale, lock_hint
from bitcpm_cli.core.runtime.vllm_platform import INSTALL_HINT, vllm_report


def deepspeed_report() -> tuple[dict[str, Any] | None, list[tuple[str, str, str]]]:
    """For `bitcpm env`: DeepSpeed's version and accelerator, the extension build folder and its locks; and
    diagnoses as (level, message, hint). None when DeepSpeed is not installed."""
    import importlib.util

    root = extensions_dir()
    diagnoses = []
    now = time.time()
    for lock in extension_locks(root):
        if is_stale(lock, now):
            diagnoses.append(("error", f"stale extension build lock {lock}: DeepSpeed runs would hang on it",
                              lock_hint(lock)))
        else:
            diagnoses.append(("warning", f"extension build lock {lock}: a build is running or was just killed",
                              f"if no run is starting, remove it (rm {lock})"))
    if importlib.util.find_spec("deepspeed") is None:
        return None, diagnoses
    report: dict[str, Any] = {"version": package_version("deepspeed"), "accelerator": None, "extensions_dir": root}
    try:
        from deepspeed.accelerator import get_accelerator

        report["accelerator"] = get_accelerator().device_name()
    except Exception as exc:  # a broken DeepSpeed install raises anything on import
        diagnoses.append(("error", f"DeepSpeed is installed but cannot start ({type(exc).__name__}: {exc})",
                          "reinstall it: pip install 'bitcpm[deepspeed]' (on CPU: DS_BUILD_OPS=0)"))
    return report, diagnoses


VARIABLES = (
    "ASCEND_RT_VISIBLE_DEVICES", "NPU_VISIBLE_DEVICES", "ASCEND_TOOLKIT_HOME", "ASCEND_HOME_PATH",
    "TORCH_DEVICE_BACKEND_AUTOLOAD", "CUDA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES",
    "LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "DS_ACCELERATOR", "TORCH_EXTENSIONS_DIR",
)
PACKAGES = ("torch", "torch_npu", "transformers", "accelerate", "safetensors", "gguf", "llama_cpp_python")


def _device_entry(kind: str, index: int | None, name: str, memory: int | None) -> dict[str, Any]:
    label = kind if index is None else f"{kind}:{index}"
    return {"device": label, "name": name, "memory_bytes": memory}


def list_devices(npu: NpuProbe | None = None) -> list[dict[str, Any]]:
    torch = import_torch()
    memory = None
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        pass
    devices = [_device_entry("cpu", None, platform.processor() or platform.machine(), memory)]
    if npu is not None and npu.usable:
        for i in range(npu.count):
            props = getattr(npu.api, "get_device_properties", None)
            total = getattr(props(i), "total_memory", None) if callable(props) else None
            devices.append(_device_entry("npu", i, npu.api.get_device_name(i), total))
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            devices.append(_device_entry("cuda", i, props.name, props.total_memory))
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        devices.append(_device_entry("mps", None, "Apple MPS", None))
    return devices


def collect_environment(requested: str = "auto") -> dict[str, Any]:
    """Everything `bitcpm env` reports; never raises for a broken device stack (that is what it diagnoses)."""
    from bitcpm_cli import __version__

    parse_request(requested)  # a misspelt device is a usage error, not a finding
    report: dict[str, Any] = {
        "bitcpm": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": {name: package_version(name) for name in PACKAGES},
        "cann": cann_version(),
        "variables": {v: os.environ[v] for v in VARIABLES if v in os.environ},
        "devices": [],
        "selected": None,
        "selection_error": None,
        "distributed_backend": None,
        "diagnoses": [],
    }
    diagnoses: list[Diagnosis] = []
    try:
        torch = import_torch()
    except DeviceError as exc:
        diagnoses.append(Diagnosis("error", exc.message, exc.hint))
        report["diagnoses"] = [asdict(d) for d in diagnoses]
        return report
    report["torch_build"] = {"version": torch.__version__, "cuda": torch.version.cuda,
                             "hip": getattr(torch.version, "hip", None)}
    npu = probe_npu()
    diagnoses += npu.diagnoses
    if "CUDA_VISIBLE_DEVICES" in os.environ and torch.version.cuda and not torch.cuda.is_available():
        diagnoses.append(Diagnosis("warning", f"CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']} "
                                   "but torch sees no GPU", "check the value against `nvidia-smi -L`"))
    report["devices"] = list_devices(npu)
    try:
        device = resolve_device(requested, npu)
        report["selected"] = str(device)
        report["distributed_backend"] = distributed_backend(device)
    except DeviceError as exc:
        report["selection_error"] = exc.message
        if not any(d.message in exc.message for d in diagnoses):
            diagnoses.append(Diagnosis("error", exc.message, exc.hint))
    report["deepspeed"], found = deepspeed_report()
    report["vllm"], broken = vllm_report()
    if broken:
        found.append(("error", f"vLLM is installed but its platform layer cannot load ({broken})",
                      INSTALL_HINT))
    diagnoses += [Diagnosis(*finding) for finding in found]
    report["diagnoses"] = [asdict(d) for d in diagnoses]
    return report


def require_no_errors(report: dict[str, Any]) -> None:
    """`env`'s verdict: exit 1 (CheckFailed) when a diagnosis is an error; the report itself is printed first."""
    errors = [d for d in report["diagnoses"] if d["level"] == "error"]
    if len(errors) == 1:
        raise CheckFailed(errors[0]["message"], hint=errors[0]["hint"] or "the report above shows the environment")
    if errors:
        raise CheckFailed(f"{len(errors)} diagnoses are errors", hint="the report above gives a hint for each",
                          problems=[d["message"] for d in errors])
