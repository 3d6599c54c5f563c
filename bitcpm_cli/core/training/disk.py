"""Write failures of a training run that are the destination's fault (full, read-only, not writable), told apart
from bugs: safetensors reports them as SafetensorError ("No space left on device (os error 28)") and torch.save as a
RuntimeError without an errno ("unexpected pos", "file write failed"), neither an OSError the output guard knows.
"""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path

REFUSED = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)
OS_ERROR = re.compile(r"os error (\d+)|\[Errno (\d+)\]")
TORCH_WRITER = ("inline_container", "PytorchStreamWriter", "file write failed", "iostream error", "unexpected pos")
LOW_SPACE = 1 << 20  # bytes: a filesystem with less free after a failed save is full for a training run


def disk_refusal(exc: BaseException, folder: Path) -> OSError | None:
    """The OSError (errno, strerror, filename=`folder`) that `exc` amounts to when the filesystem of `folder`
    refused a write; None for anything else (an OSError is left to the output guard as it is)."""
    if isinstance(exc, OSError) or not isinstance(exc, Exception):
        return None
    chain = list(_chain(exc))
    for link in chain:
        code = link.errno if isinstance(link, OSError) else _errno_in(str(link))
        if code in REFUSED:
            return OSError(code, os.strerror(code), str(folder))
    if any(marker in str(link) for link in chain for marker in TORCH_WRITER):
        code = filesystem_refusal(folder)
        if code is not None:
            return OSError(code, os.strerror(code), str(folder))
    return None


def filesystem_refusal(folder: Path) -> int | None:
    """EROFS, EACCES or ENOSPC when the filesystem holding `folder` is read-only, not writable or (nearly) full."""
    existing = next((p for p in (folder, *folder.parents) if p.exists()), None)
    if existing is None:
        return None
    stats = os.statvfs(existing)
    if stats.f_flag & os.ST_RDONLY:
        return errno.EROFS
    if not os.access(existing, os.W_OK):
        return errno.EACCES
    if stats.f_bavail * stats.f_frsize < LOW_SPACE:
        return errno.ENOSPC
    return None


def _errno_in(message: str) -> int | None:
    match = OS_ERROR.search(message)
    return int(match.group(1) or match.group(2)) if match else None


def _chain(exc: BaseException):
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__
