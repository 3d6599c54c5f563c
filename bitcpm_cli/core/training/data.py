"""Pre-training data: texts from .jsonl / .txt / .parquet, tokenised, joined with EOS and packed into blocks.

Streaming throughout: files are read line by line (parquet batch by batch), so a corpus never has to fit in memory.
The order is fixed, so a resumed run sees exactly the blocks the interrupted run would have seen.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from bitcpm_cli.core.errors import InputError
from bitcpm_cli.core.io.readers import file_problem, iter_text_lines, parse_json

SUFFIXES = (".jsonl", ".txt", ".parquet")


def check_data_files(paths: list[str]) -> list[Path]:
    problems = []
    files = [Path(p) for p in paths]
    for path in files:
        if problem := file_problem(path, "data file"):
            problems.append(problem)
        elif path.suffix not in SUFFIXES:
            problems.append(f"data file {path} is not .jsonl, .txt or .parquet")
    if problems:
        raise InputError(problems[0], hint="pass .jsonl files with a `text` field, .txt or .parquet",
                         problems=problems if len(problems) > 1 else ())
    return files


def iter_texts(files: list[Path], field: str = "text") -> Iterator[str]:
    """Every document's text; a malformed line is an InputError naming the file and line."""
    for path in files:
        if path.suffix == ".parquet":
            yield from _iter_parquet(path, field)
            continue
        for number, line in iter_text_lines(path, "data file"):
            if not line.strip():
                continue
            if path.suffix == ".txt":
                yield line
                continue
            record = parse_json(line, f"{path}:{number}", "data file", line=True)
            if not isinstance(record, dict) or not isinstance(record.get(field), str):
                raise InputError(f"{path}:{number}: no {field!r} string in this record",
                                 hint=f'each line needs {{"{field}": "..."}}')
            yield record[field]


def _iter_parquet(path: Path, field: str) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise InputError(f"reading {path} needs pyarrow", hint="pip install pyarrow") from None
    try:
        table = pq.ParquetFile(path)
    except Exception as exc:
        raise InputError(f"cannot read {path}: {exc}", hint="the parquet file is corrupt") from None
    if field not in table.schema_arrow.names:
        raise InputError(f"{path} has no {field!r} column (columns: {', '.join(table.schema_arrow.names)})",
                         hint=f"name the text column {field!r}")
    for batch in table.iter_batches(columns=[field]):
        for value in batch.column(0).to_pylist():
            if value is not None and not isinstance(value, str):
                raise InputError(f"{path}: column {field!r} holds {type(value).__name__} values, not text",
                                 hint=f"store the documents as strings in {field!r}")
            if value:
                yield value


class PackedBlocks(torch.utils.data.IterableDataset):
    """Fixed-length blocks of `block_size` tokens: BOS + document + EOS, concatenated (labels = inputs)."""

    def __init__(self, files: list[Path], tokenizer: Any, block_size: int):
        self.files, self.tokenizer, self.block_size = files, tokenizer, block_size

    def _token_stream(self) -> Iterator[int]:
        bos, eos = self.tokenizer.bos_token_id, self.tokenizer.eos_token_id
        for text in iter_texts(self.files):
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            if bos is not None:
                yield bos
            yield from ids
            if eos is not None:
                yield eos

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        buffer: list[int] = []
        for token in self._token_stream():
            buffer.append(token)
            if len(buffer) == self.block_size:
                block = torch.tensor(buffer, dtype=torch.long)
                yield {"input_ids": block, "labels": block.clone()}
                buffer = []


def first_block(dataset: PackedBlocks) -> dict[str, torch.Tensor]:
    """The first block, or an InputError when the corpus is too small to fill one."""
    for block in dataset:
        return block
    raise InputError(
        f"the data holds fewer than block_size={dataset.block_size} tokens ({', '.join(map(str, dataset.files))})",
        hint="add data or lower --block-size",
    )


@dataclass
class DataPlan:
    """What a training command feeds the Trainer: the dataset, its collator, and a summary to report."""

    dataset: Any
    collator: Callable | None = None
    summary: dict[str, Any] = field(default_factory=dict)
    tokens_per_sample: int | None = None  # for tokens/s; None: counted from attention masks
