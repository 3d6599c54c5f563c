"""DeepSpeed's C++ extension builds: where torch builds them, and the lock files a killed build leaves
(every later build would wait on such a lock forever).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

EXTENSION_LOCK_AGE_S = 600  # a build of DeepSpeed's small CPU extension takes about a minute


def extension_locks(root: str | None) -> list[Path]:
    """`lock` files in torch's C++-extension build folder `root` (DeepSpeed JIT-builds its CPU communication op
    there); none when there is no such folder.

    A build that was killed leaves its lock behind and every later build waits on it forever."""
    if not root:
        return []
    base = Path(root)
    if not base.is_dir():
        return []
    return sorted(p for pattern in ("*/lock", "*/*/lock") for p in base.glob(pattern) if p.is_file())


def is_stale(lock: Path, now: float) -> bool:
    return now - lock.stat().st_mtime > EXTENSION_LOCK_AGE_S


def stale_extension_locks() -> list[Path]:
    now = time.time()
    return [p for p in extension_locks(extensions_dir()) if is_stale(p, now)]


def lock_hint(lock: Path) -> str:
    return (f"a killed build left it; when no other training run is starting, remove it (rm {lock}) and the "
            "extension is rebuilt once")


def extensions_dir() -> str | None:
    """Where torch builds C++ extensions (DeepSpeed's CPU communication op among them)."""
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return os.environ["TORCH_EXTENSIONS_DIR"]
    try:
        from torch.utils.cpp_extension import get_default_build_root
    except ImportError:
        return None
    return get_default_build_root()
