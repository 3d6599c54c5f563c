"""The output guard (core/io/outputs.py): confinement, claims, stale staging, disk errors, never clobbering."""

import errno
import multiprocessing
import os
import subprocess
import sys

import pytest

from bitcpm_cli.core.errors import InputError
from bitcpm_cli.core.io.outputs import OutputGuard, check_output, remove_stale, write_text_output


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def listing(folder):
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize("output,message", [
    ("model", "is the input"), ("model/model.safetensors", "inside the input"), ("model/sub/x.json", "inside the input"),
    (".", "input is inside"),
])
def test_output_never_an_input_or_around_one(tmp_path, monkeypatch, output, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "model.safetensors").write_bytes(b"weights")
    with pytest.raises(InputError, match=message):
        check_output(output, [tmp_path / "model"], overwrite=True)


def test_symlinks_are_resolved(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "w.bin").write_bytes(b"w")
    (tmp_path / "alias").symlink_to(tmp_path / "model")
    (tmp_path / "link.json").symlink_to(tmp_path / "model" / "w.bin")
    with pytest.raises(InputError, match="inside the input"):
        check_output(tmp_path / "alias" / "out.json", [tmp_path / "model"])
    with pytest.raises(InputError, match="inside the input"):
        check_output(tmp_path / "link.json", [tmp_path / "model"], overwrite=True)
    assert (tmp_path / "model" / "w.bin").read_bytes() == b"w"


def test_existing_output_needs_overwrite_and_is_replaced_only_when_complete(tmp_path):
    out = tmp_path / "r.json"
    out.write_text("old")
    with pytest.raises(InputError, match="already exists"):
        write_text_output("new", out)
    with pytest.raises(RuntimeError):
        with OutputGuard(out, overwrite=True) as staging:
            staging.write_text("half")
            raise RuntimeError("killed half-way")
    assert out.read_text() == "old" and listing(tmp_path) == ["r.json"]
    write_text_output("new", out, overwrite=True)
    assert out.read_text() == "new" and listing(tmp_path) == ["r.json"]


def test_folder_output_replaced_atomically(tmp_path):
    out = tmp_path / "fused"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with OutputGuard(out, overwrite=True, kind="dir") as staging:
        staging.mkdir()
        (staging / "new.txt").write_text("new")
    assert listing(out) == ["new.txt"] and listing(tmp_path) == ["fused"]


def _hold_claim(path, ready, release):
    guard = OutputGuard(path)
    staging = guard.claim()
    staging.write_text("first")
    ready.set()
    release.wait(30)
    guard.commit()


def test_two_concurrent_writers_exactly_one_wins(tmp_path):
    out = tmp_path / "report.json"
    context = multiprocessing.get_context("fork")
    ready, release = context.Event(), context.Event()
    first = context.Process(target=_hold_claim, args=(out, ready, release))
    first.start()
    try:
        assert ready.wait(30)
        with pytest.raises(InputError, match=f"another bitcpm run \\(pid {first.pid}\\) is writing"):
            write_text_output("second", out)
    finally:
        release.set()
        first.join(30)
    assert first.exitcode == 0 and out.read_text() == "first"
    with pytest.raises(InputError, match="already exists"):
        write_text_output("second", out)
    assert listing(tmp_path) == ["report.json"]


def test_commit_never_clobbers_a_file_that_appeared(tmp_path):
    out = tmp_path / "r.json"
    guard = OutputGuard(out)
    guard.claim().write_text("mine")
    out.write_text("someone else's")
    with pytest.raises(InputError, match="appeared while this run was writing"):
        guard.commit()
    assert out.read_text() == "someone else's" and listing(tmp_path) == ["r.json"]


def test_stale_claim_and_staging_of_a_dead_pid_are_removed(tmp_path):
    pid = dead_pid()
    out = tmp_path / "fused"
    (tmp_path / ".bitcpm-claim-fused").write_text(f"{pid}\n")
    (tmp_path / f".bitcpm-tmp-{pid}-fused").mkdir()
    (tmp_path / f".bitcpm-tmp-{pid}-fused" / "model.safetensors").write_bytes(b"partial")
    (tmp_path / f".bitcpm-tmp-{pid}-fused.scratch").mkdir()
    (tmp_path / f".bitcpm-tmp-{pid}-other").mkdir()  # another output's: not ours to remove
    live = os.getppid()
    (tmp_path / f".bitcpm-tmp-{live}-fused").mkdir()  # a live writer's: kept
    with OutputGuard(out, kind="dir") as staging:
        staging.mkdir()
    assert set(listing(tmp_path)) == {f".bitcpm-tmp-{pid}-other", f".bitcpm-tmp-{live}-fused", "fused"}
    assert remove_stale(out) == []


def test_a_live_claim_refuses(tmp_path):
    (tmp_path / ".bitcpm-claim-r.json").write_text(f"{os.getppid()}\n")
    with pytest.raises(InputError, match=f"pid {os.getppid()}"):
        write_text_output("x", tmp_path / "r.json")
    assert not (tmp_path / "r.json").exists()


@pytest.mark.parametrize("code", [errno.EROFS, errno.ENOSPC, errno.EACCES, errno.EDQUOT])
def test_disk_errors_are_exit_2_naming_the_path_with_nothing_left(tmp_path, code):
    out = tmp_path / "out"
    with pytest.raises(InputError, match=f"cannot write --output {out}: {os.strerror(code)}"):
        with OutputGuard(out, kind="dir") as staging:
            staging.mkdir()
            (staging / "a").write_text("x")
            raise OSError(code, os.strerror(code), str(staging / "b"))
    assert listing(tmp_path) == []


def test_read_only_folder_refuses_the_claim(tmp_path, monkeypatch):
    real_open = os.open

    def read_only(path, flags, *args):
        if flags & os.O_CREAT:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", read_only)
    with pytest.raises(InputError, match="Read-only file system"):
        write_text_output("x", tmp_path / "r.json")
    assert listing(tmp_path) == []


def test_an_input_read_error_is_not_blamed_on_the_output(tmp_path):
    with pytest.raises(PermissionError):
        with OutputGuard(tmp_path / "out.json"):
            raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "input.json"))
    assert listing(tmp_path) == []


def test_unstaged_folder_created_by_a_failed_run_is_removed(tmp_path):
    out = tmp_path / "runs" / "a"
    guard = OutputGuard(out, overwrite=True, kind="dir", staged=False,
                        keep_on_error=lambda folder: (folder / "checkpoint").exists())
    with pytest.raises(RuntimeError):
        with guard as folder:
            (folder / "metrics.jsonl").write_text("{}\n")
            raise RuntimeError("bad optimizer")
    assert listing(tmp_path) == []
    with pytest.raises(RuntimeError):
        with OutputGuard(out, overwrite=True, kind="dir", staged=False,
                         keep_on_error=lambda folder: (folder / "checkpoint").exists()) as folder:
            (folder / "checkpoint").mkdir()
            raise RuntimeError("interrupted after a checkpoint")
    assert listing(out) == ["checkpoint"]


def test_a_failed_run_into_a_folder_that_was_there_removes_only_what_it_added(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine\n")
    with pytest.raises(RuntimeError):
        with OutputGuard(out, overwrite=True, kind="dir", staged=False,
                         keep_on_error=lambda folder: (folder / "checkpoint").exists()) as folder:
            (folder / "metrics.jsonl").write_text("{}\n")  # a later run would take this for an earlier run's
            (folder / "logs").mkdir()
            raise RuntimeError("bad optimizer")
    assert listing(out) == ["notes.txt"] and (out / "notes.txt").read_text() == "mine\n"
