"""Device layer: NPU / CUDA / MPS / CPU selection and the distributed backend for a device.

An explicitly requested device that is missing is an error, never a fallback: a silent fallback turns an
"NPU vs CPU" comparison into "CPU vs CPU". torch_npu is imported lazily, never at module level.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bitcpm_cli.core.errors import DeviceError, did_you_mean

DEVICE_TYPES = ("auto", "cpu", "cuda", "npu", "mps")
BACKENDS = {"npu": "hccl", "cuda": "nccl"}


CANN_ENV_HINT = ("source the CANN environment first (e.g. `source /usr/local/Ascend/ascend-toolkit/set_env.sh`), "
                 "or set TORCH_DEVICE_BACKEND_AUTOLOAD=0 to use torch without the NPU")


@dataclass
class Diagnosis:
    level: str  # "error" | "warning" | "info"
    message: str
    hint: str | None = None


@dataclass
class NpuProbe:
    installed: bool = False
    import_error: str | None = None
    available: bool = False
    count: int = 0
    diagnoses: list[Diagnosis] = field(default_factory=list)
    api: Any = None  # the torch.npu namespace

    @property
    def usable(self) -> bool:
        return self.api is not None and self.available and self.count > 0


def _module_present(name: str) -> bool:
    if sys.modules.get(name) is not None:
        return True
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def import_torch():
    """`import torch`, turning the torch_npu-without-CANN failure into a clear DeviceError."""
    try:
        return importlib.import_module("torch")
    except Exception as exc:
        if _module_present("torch_npu") and os.environ.get("TORCH_DEVICE_BACKEND_AUTOLOAD") != "0":
            raise DeviceError(
                f"import torch failed because torch_npu is installed but CANN is not usable ({_first_line(exc)})",
                hint=CANN_ENV_HINT,
            ) from exc
        raise DeviceError(f"import torch failed ({_first_line(exc)})",
                          hint="reinstall torch (pip install 'torch>=2.4')") from exc


def probe_npu() -> NpuProbe:
    """What torch_npu says, with the known Ascend pitfalls diagnosed."""
    probe = NpuProbe(installed=_module_present("torch_npu"))
    if not probe.installed:
        return probe
    torch = import_torch()
    try:
        torch_npu = importlib.import_module("torch_npu")
    except Exception as exc:
        probe.import_error = _first_line(exc)
        probe.diagnoses.append(Diagnosis("error", f"torch_npu is installed but cannot be imported ({probe.import_error})",
                                         CANN_ENV_HINT))
        return probe
    probe.api = getattr(torch, "npu", None) or getattr(torch_npu, "npu", None)
    if probe.api is None:
        probe.diagnoses.append(Diagnosis("error", "torch_npu imported but registered no torch.npu backend",
                                         "reinstall torch_npu built for this torch version"))
        return probe
    probe.available = bool(probe.api.is_available())
    probe.count = int(probe.api.device_count()) if probe.available else 0
    visible = os.environ.get("ASCEND_RT_VISIBLE_DEVICES")
    if probe.available and probe.count == 0:
        if visible is not None:
            probe.diagnoses.append(Diagnosis(
                "error",
                f"ASCEND_RT_VISIBLE_DEVICES={visible} hides every NPU: torch.npu.is_available() is True but "
                "device_count() is 0, so no tensor can be created",
                "unset ASCEND_RT_VISIBLE_DEVICES (or set it to logical ids that exist in this container)",
            ))
        else:
            probe.diagnoses.append(Diagnosis(
                "error", "torch.npu.is_available() is True but device_count() is 0",
                "check `npu-smi info` and that this container can open /dev/davinci*"))
    elif not probe.available:
        probe.diagnoses.append(Diagnosis("warning", "torch_npu is installed but reports no NPU available",
                                         "check the driver with `npu-smi info` and " + CANN_ENV_HINT))
    torch_mm = _major_minor(getattr(torch, "__version__", ""))
    npu_version = package_version("torch_npu") or getattr(getattr(torch_npu, "version", None), "__version__", None)
    if npu_version and torch_mm and _major_minor(npu_version) != torch_mm:
        probe.diagnoses.append(Diagnosis(
            "warning", f"torch_npu {npu_version} does not match torch {torch.__version__}",
            f"install the torch_npu release built for torch {torch_mm}"))
    return probe


def _major_minor(version: str) -> str | None:
    match = re.match(r"(\d+)\.(\d+)", version or "")
    return f"{match.group(1)}.{match.group(2)}" if match else None


def package_version(name: str) -> str | None:
    for candidate in {name, name.replace("_", "-")}:
        try:
            return importlib.metadata.version(candidate)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def parse_request(requested: str) -> tuple[str, int | None]:
    text = (requested or "auto").strip().lower()
    kind, _, index = text.partition(":")
    if kind == "gpu":
        kind = "cuda"
    hint = "use auto, cpu, cuda, cuda:N, npu, npu:N or mps"
    if kind not in DEVICE_TYPES:
        raise DeviceError(f"unknown device {requested!r}{did_you_mean(kind, DEVICE_TYPES)}", hint=hint)
    if index and kind in ("auto", "cpu"):
        raise DeviceError(f"invalid device {requested!r}: {kind} takes no index", hint=hint)
    if index and not index.isdigit():
        raise DeviceError(f"invalid device {requested!r}: {index!r} is not a device index", hint=hint)
    return kind, int(index) if index else None


def is_main_process() -> bool:
    """Rank 0 of a torchrun / DeepSpeed job, or a single process: the one that writes reports and final outputs."""
    return int(os.environ.get("RANK", "0") or 0) == 0


def _local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0") or 0)


def resolve_device(requested: str = "auto", npu: NpuProbe | None = None):
    """A torch.device for `requested`; auto picks npu > cuda > mps > cpu. Missing explicit devices raise."""
    torch = import_torch()
    kind, index = parse_request(requested)
    if kind == "cpu":
        return torch.device("cpu")
    if kind in ("auto", "npu"):
        npu = npu or probe_npu()
        if npu.usable:
            chosen = _local_rank() if index is None else index
            if chosen >= npu.count:
                raise DeviceError(f"npu:{chosen} requested but only {npu.count} NPU(s) are visible",
                                  hint=f"use npu:0 .. npu:{npu.count - 1}")
            return torch.device("npu", chosen)
        if kind == "npu" or npu.installed:
            problem = next((d for d in npu.diagnoses if d.level == "error"), None) or (npu.diagnoses or [None])[0]
            if not npu.installed:
                raise DeviceError("--device npu requested but torch_npu is not installed",
                                  hint="install torch_npu matching your torch and CANN (pip install 'bitcpm[npu]'), "
                                       "or choose --device cpu")
            # torch_npu is installed but broken: falling back to CPU would hide it, even under auto.
            raise DeviceError(
                f"no usable NPU: {problem.message if problem else 'unknown reason'}",
                hint=((problem.hint + "; ") if problem and problem.hint else "")
                + ("or pass --device cpu to run on the CPU on purpose" if kind == "auto" else "see `bitcpm env`"),
            )
    if kind in ("auto", "cuda"):
        if torch.cuda.is_available():
            count = torch.cuda.device_count()
            chosen = _local_rank() if index is None else index
            if chosen >= count:
                raise DeviceError(f"cuda:{chosen} requested but only {count} GPU(s) are visible",
                                  hint=f"use cuda:0 .. cuda:{count - 1} (CUDA_VISIBLE_DEVICES="
                                       f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})")
            return torch.device("cuda", chosen)
        if kind == "cuda":
            why = ("this torch build has no CUDA support" if torch.version.cuda is None
                   else f"torch was built with CUDA {torch.version.cuda} but sees no GPU")
            raise DeviceError(f"--device cuda requested but CUDA is not available: {why}",
                              hint="install a CUDA build of torch / check `nvidia-smi` and CUDA_VISIBLE_DEVICES, "
                                   "or choose --device cpu")
    mps = getattr(torch.backends, "mps", None)
    if kind in ("auto", "mps"):
        if mps is not None and mps.is_available():
            return torch.device("mps")
        if kind == "mps":
            raise DeviceError("--device mps requested but MPS is not available",
                              hint="MPS needs Apple silicon and macOS 12.3+; or choose --device cpu")
    return torch.device("cpu")


def distributed_backend(device) -> str:
    """torch.distributed backend for a device: hccl on NPU, nccl on CUDA, gloo otherwise."""
    return BACKENDS.get(getattr(device, "type", str(device)), "gloo")


def cann_version() -> str | None:
    """Best-effort CANN toolkit version from the toolkit's install files."""
    roots = [os.environ.get(v) for v in ("ASCEND_TOOLKIT_HOME", "ASCEND_HOME_PATH")]
    roots += ["/usr/local/Ascend/ascend-toolkit/latest", "/usr/local/Ascend/cann"]
    for root in filter(None, roots):
        base = Path(root)
        if not base.is_dir():
            continue
        candidates = [base / "version.cfg", base / "compiler" / "version.info", base / "runtime" / "version.info"]
        candidates += sorted(base.glob("*/ascend_toolkit_install.info"))
        for path in candidates:
            try:
                text = path.read_text(errors="replace")
            except OSError:
                continue
            match = re.search(r"^\s*(?:version|Version)\s*=\s*\[?([0-9][\w.\-]*)", text, re.MULTILINE)
            if match:
                return match.group(1)
    return None
