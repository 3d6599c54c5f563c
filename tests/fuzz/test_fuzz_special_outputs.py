"""Fuzz every command's output path with special files: FIFOs, sockets, device nodes (root only), links to them,
link chains, dangling links, folders where a file is expected and files where a folder is, with and without
--overwrite (issue #23 item 1).

Invariants: exit 0 or 2 (never 3), no traceback; a special file is never replaced (it is still the same kind of node
afterwards); on exit 2 the output folder holds exactly what it held before; inputs are byte-identical.
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bitcpm_cli.cli.app import app
from tests.cli.test_outputs_special_and_disks import make_special
from tests.fuzz.hostile import snapshot
from tests.fuzz.test_fuzz_commands import BOUNDED, RUNNER
from tests.helpers import build_tiny_model

NODES = ["fifo", "socket", "chardev", "folder", "file", "dangling-link"]


def make_node(path: Path, kind: str) -> None:
    if kind in ("fifo", "socket", "chardev"):
        make_special(path, kind)
    elif kind == "folder":
        path.mkdir()
        (path / "keep.txt").write_text("keep")
    elif kind == "file":
        path.write_text("keep")
    elif kind == "dangling-link":
        path.symlink_to(path.parent / "nowhere")


def node_kind(path: Path) -> str:
    mode = os.lstat(path).st_mode
    return next(name for test, name in ((stat.S_ISLNK, "link"), (stat.S_ISFIFO, "fifo"), (stat.S_ISSOCK, "socket"),
                                        (stat.S_ISCHR, "chardev"), (stat.S_ISDIR, "folder"), (stat.S_ISREG, "file"))
                if test(mode))


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz-special")
    build_tiny_model(root / "model", kind="qat")
    results = '{"schema": "bitcpm.results/1", "results": [{"id": 0, "token_ids": [1, 2, 3]}]}'
    (root / "a.json").write_text(results)
    (root / "b.json").write_text(results)
    return root


COMMANDS = {
    "fix-config": lambda w, out: ["fix-config", w / "model", "--output", out],
    "convert": lambda w, out: ["convert", "-i", w / "model", "-o", out],
    "compare": lambda w, out: ["compare", w / "a.json", w / "b.json", "--output", out],
    "infer": lambda w, out: ["infer", "-m", w / "model", "-p", "hi", "-o", out, "--device", "cpu",
                             "--max-new-tokens", "1"],
}
KINDS = [k for k in NODES if k != "chardev" or os.geteuid() == 0]


@BOUNDED
@given(command=st.sampled_from(sorted(COMMANDS)), kind=st.sampled_from(KINDS), links=st.integers(0, 2),
       overwrite=st.booleans())
def test_special_outputs_are_never_replaced(work, command, kind, links, overwrite):
    with tempfile.TemporaryDirectory(dir=work) as folder:
        folder = Path(folder)
        node = folder / "node"
        make_node(node, kind)
        output = node
        for index in range(links):  # a chain of links ending at the node
            link = folder / f"link{index}"
            link.symlink_to(output)
            output = link
        before_inputs, before_kind = snapshot(work / "model"), node_kind(node)
        listing = sorted(os.listdir(folder))
        args = [str(a) for a in COMMANDS[command](work, output)] + (["--overwrite"] if overwrite else [])
        result = RUNNER.invoke(app, args)
        text = result.output + (result.stderr or "")
        assert result.exit_code in (0, 1, 2), (args, text)
        assert "Traceback" not in text and "internal error" not in text, text
        assert snapshot(work / "model") == before_inputs
        if kind in ("fifo", "socket", "chardev"):
            assert result.exit_code == 2 and "not a " in text, text  # refused, whatever links lead there
            assert node_kind(node) == before_kind
        if result.exit_code == 2:
            assert sorted(os.listdir(folder)) == listing, "a refused run changed the output folder"
            assert node_kind(node) == before_kind
