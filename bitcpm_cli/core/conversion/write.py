"""The output of `convert`, written: safetensors shards laid out from the plan (one writer per shard, in the
background, through direct I/O), the shard index, config.json, the files copied from the input folder and the
provenance file.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import torch

from bitcpm_cli import __version__
from bitcpm_cli.core.conversion.plan import packed_scheme_recording
from bitcpm_cli.core.conversion.report import ConvertResult
from bitcpm_cli.core.formats.packed import PACKED_SHAPES_KEY, packed_base
from bitcpm_cli.core.io.safetensors import SafetensorsStreamWriter, tensor_nbytes
from bitcpm_cli.core.quant import LayerQuant, QuantScheme
from bitcpm_cli.core.quant.activations import FUSED_CONFIG_KEY, fused_record
from bitcpm_cli.core.quant.scheme import CONFIG_KEY

PROVENANCE_FILE = "bitcpm_convert.json"


# Files of an input directory that are not copied: weights, indexes, its config (rewritten), old provenance.
NOT_COPIED = re.compile(r".*\.(safetensors|bin|pt|pth|ckpt)$|.*\.index\.json$|config\.json(\.bak.*)?$|"
                        + re.escape(PROVENANCE_FILE) + "$")


# ---- output writing ------------------------------------------------------------------------------
def _shard(specs: list[tuple[str, str, tuple[int, ...]]], max_bytes: int) -> list[list[tuple[str, str, tuple]]]:
    shards: list[list] = [[]]
    size = 0
    for spec in specs:
        nbytes = tensor_nbytes(spec[1], spec[2])
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += nbytes
    return shards


class ShardedWriter:
    def __init__(self, folder: Path, specs, max_bytes: int, packed_shapes: dict[str, list[int]], single: str | None):
        self.shards = [specs] if single else _shard(specs, max_bytes)
        n = len(self.shards)
        self.names = [single] if single else (["model.safetensors"] if n == 1 else
                                              [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)])
        self.folder, self.packed_shapes = folder, packed_shapes
        # every output tensor's planned (dtype, shape), and (file, offset, length) once its shard is laid out
        self.layout = {spec[0]: (spec[1], tuple(spec[2])) for shard in self.shards for spec in shard}
        self.places: dict[str, tuple[Path, int, int]] = {}
        self._shard_of = {spec[0]: i for i, shard in enumerate(self.shards) for spec in shard}
        self._index = 0
        self._remaining = 0
        self._writer: SafetensorsStreamWriter | None = None
        self.weight_map: dict[str, str] = {}
        self.total_size = 0
        self.metadata: dict[Path, dict[str, str]] = {}  # every shard's header metadata, as planned

    def _open_next(self) -> None:
        shard = self.shards[self._index]
        shapes = {b: self.packed_shapes[b] for b in (packed_base(s[0]) for s in shard) if b in self.packed_shapes}
        metadata = {"format": "pt"}
        if shapes:
            metadata[PACKED_SHAPES_KEY] = json.dumps(shapes, separators=(",", ":"))
        path = self.folder / self.names[self._index]
        self.metadata[path] = metadata
        self._writer = SafetensorsStreamWriter(path, shard, metadata)
        self.places.update({name: (path, *span) for name, span in self._writer.ranges.items()})
        self.total_size += self._writer.nbytes
        self._remaining = len(shard)
        for spec in shard:
            self.weight_map[spec[0]] = self.names[self._index]

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._writer is None:
            self._open_next()
        self._writer.write(name, tensor)
        self._remaining -= 1
        if self._remaining == 0:
            self._writer.close()
            self._writer = None
            self._index += 1

    def flush(self) -> None:
        """Put what the open shard has gathered on the disk, but a partial last block (DirectFile.flush)."""
        if self._writer is not None:
            self._writer.flush()

    def on_disk(self, name: str) -> bool:
        """Whether all of an output tensor's bytes are in its file (asked on the thread that writes)."""
        index = self._shard_of[name]
        if index != self._index or self._writer is None:
            return index < self._index  # a closed shard, or one not begun
        begin, size = self._writer.ranges[name]
        return begin + size <= self._writer.durable

    def abort(self) -> None:
        """Close the shard being written, unfinished (after a failure: the staging folder is removed)."""
        if self._writer is not None:
            self._writer.abort()
            self._writer = None

    def write_index(self) -> None:
        if len(self.names) > 1:
            index = {"metadata": {"total_size": self.total_size}, "weight_map": self.weight_map}
            (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def write_folder_files(source: Path, staging: Path, config: dict | None, result: ConvertResult, fmt: str,
                        scheme: QuantScheme | None, targets: dict[str, LayerQuant], mode: str,
                        activations: dict[str, str] | None = None) -> None:
    """config.json (a fused output records its activation schemes under `bitcpm_activations`, a packed one keeps
    them in its bitcpm_quant), the input folder's other files and the provenance file."""
    activations = activations or {}
    if config is not None:
        out_config = {k: v for k, v in config.items() if k not in (CONFIG_KEY, FUSED_CONFIG_KEY)}
        out_config["dtype" if "dtype" in config else "torch_dtype"] = result.dtype
        if fmt == "packed":
            group_sizes = {t.group_size for t in targets.values()}
            # The packed scales are the learned ones where there were: the packed model holds no quant_alpha tensors.
            packed_scheme = packed_scheme_recording(scheme or QuantScheme(), targets, activations).replace(
                group_size=next(iter(group_sizes)), learned_scales=False)
            out_config[CONFIG_KEY] = {**packed_scheme.to_dict(), "packed": True}
        elif (record := fused_record(activations)) is not None:
            out_config[FUSED_CONFIG_KEY] = record
        (staging / "config.json").write_text(json.dumps(out_config, indent=2, ensure_ascii=False) + "\n")
    else:
        result.notes.append("the input has no config.json: the output folder holds weights only")
    if source.is_dir():
        for path in sorted(source.iterdir()):
            if path.is_file() and not NOT_COPIED.fullmatch(path.name):
                shutil.copy2(path, staging / path.name)
    provenance = {
        "tool": f"bitcpm {__version__}",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "input": {"path": str(source.resolve()), "fingerprint": result.fingerprint, "kind": result.input_kind},
        "format": fmt, "dtype": result.dtype, "scheme": result.scheme,
        "tensors": {"total": result.tensors_in, "quantized": result.tensors_quantized}, "notes": result.notes,
        "warnings": result.warnings,
    }
    (staging / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n")
