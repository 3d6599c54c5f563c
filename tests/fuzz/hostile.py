"""Hostile and careless inputs shared by the safety regression tests and the fuzz suite."""

from __future__ import annotations

import json
from pathlib import Path


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (relative path -> bytes), symlinks as their target: to prove nothing changed."""
    state = {}
    for path in sorted(folder.rglob("*")):
        key = str(path.relative_to(folder))
        if path.is_symlink():
            state[key] = b"->" + str(path.readlink()).encode()
        elif path.is_file():
            state[key] = path.read_bytes()
        else:
            state[key] = b"<dir>"
    return state


def make_remote_code_folder(folder: Path, model: Path, marker: Path) -> Path:
    """A copy of a working model folder whose config and tokenizer ask for the folder's own code (auto_map),
    and whose code writes `marker` when it is imported."""
    import shutil

    shutil.copytree(model, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="evil", auto_map={"AutoConfig": "evil.EvilConfig",
                                               "AutoModelForCausalLM": "evil.EvilModel"})
    (folder / "config.json").write_text(json.dumps(config))
    tokenizer = json.loads((folder / "tokenizer_config.json").read_text())
    tokenizer.update(tokenizer_class="EvilTokenizer", auto_map={"AutoTokenizer": ["evil.EvilTokenizer", None]})
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer))
    (folder / "evil.py").write_text(
        f"open({str(marker)!r}, 'w').write('code ran')\n"
        "from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast\n"
        "class EvilConfig(LlamaConfig):\n    model_type = 'evil'\n"
        "class EvilModel(LlamaForCausalLM):\n    config_class = EvilConfig\n"
        "class EvilTokenizer(PreTrainedTokenizerFast):\n    pass\n")
    return folder


class Exploit:
    """A pickle payload that writes a marker file when unpickled."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "pickle ran"))


def write_hostile_bin(path: Path, marker: Path) -> Path:
    import torch

    torch.save({"model.embed_tokens.weight": torch.zeros(2, 2), "payload": Exploit(marker)}, path)
    return path
