"""The sha256 fingerprint of a file or of a checkpoint (every weight file, in order), as results files and provenance
record it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from bitcpm_cli.core.model.checkpoint import WeightFiles


# ---- fingerprints ------------------------------------------------------------------------------------------------
def sha256_file(path: str | Path, digest: "hashlib._Hash | None" = None) -> str:
    """`sha256:<hex>` of a file's bytes (fed into `digest` when given, to hash several files in order)."""
    digest = digest or hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(2**24), b""):
            digest.update(block)
    return f"sha256:{digest.hexdigest()}"


def fingerprint(files: WeightFiles) -> str:
    """`sha256:<hex>` over the bytes of every weight file of a checkpoint, in order (what `convert` records as its
    input's fingerprint, computed while it reads)."""
    digest = hashlib.sha256()
    for file in files.files:
        sha256_file(file, digest)
    return f"sha256:{digest.hexdigest()}"
