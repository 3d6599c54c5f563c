"""The one output guard every command that writes goes through.

    guard = OutputGuard(output, inputs=[model_dir, prompts_file], overwrite=False, kind="file")
    with guard as staging:          # claims `output`, returns the temporary path to write
        write(staging)              # a file, or a folder you create (kind="dir")
    # on success the staging path is renamed into place; on any error it is removed

What it guarantees (each raised as InputError, exit 2, before anything is written):

- the output is not any input, does not lie inside an input, and does not contain one; paths are compared after
  resolving symlinks (`inputs` holds every file and folder the command reads);
- an existing output is replaced only with `overwrite=True`, and then only once the new one is complete;
- a new output is claimed atomically: a claim file `.bitcpm-claim-<name>` beside it is created with O_EXCL and holds
  the writer's pid, so of two concurrent runs to the same output exactly one proceeds, the other is refused; the
  final move into place never replaces a path that appeared meanwhile (hard link / rename, both refuse to clobber);
- staging paths are `.bitcpm-tmp-<pid>-<name>` beside the output; staging paths and claims left by a writer whose
  pid is no longer alive (a killed run) are removed by the next run to that output;
- a read-only, full or forbidden destination (EROFS, ENOSPC, EDQUOT, EACCES, EPERM) is an InputError naming the
  path, with every staging path and the claim removed.

`staged=False` (training output folders, written progressively and resumed in place) keeps the path, confinement
and claim checks but writes into the output itself; a folder the guard created is removed again when the command
fails before `keep_on_error` says its content is worth keeping.

`check_output` runs the same checks without claiming anything, for commands that validate the output path before a
long computation and write at the end.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import stat
from pathlib import Path
from typing import Any, Callable, Iterable

from bitcpm_cli.core.errors import InputError
from bitcpm_cli.core.io.readers import special_kind

STAGING_PREFIX = ".bitcpm-tmp-"
CLAIM_PREFIX = ".bitcpm-claim-"
OLD_PREFIX = ".bitcpm-old-"
WRITE_ERRNOS = {errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM}


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _resolved(path: str | os.PathLike[str]) -> Path:
    try:
        return Path(path).expanduser().resolve()
    except (RuntimeError, OSError) as exc:  # Python 3.11 raises RuntimeError for a symlink loop, later ones OSError
        raise InputError(f"cannot resolve {path}: {exc}", hint="a symbolic link in this path points back into "
                                                                "itself (a loop); fix or remove it") from None


def _within(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def anchored(path: str | os.PathLike[str]) -> Path:
    """`path` with its folder resolved now (symlinks, `..`) and its own name kept: where a run writes and cleans up,
    fixed at the start, so a parent retargeted mid-run cannot scatter its staging files or claims."""
    path = Path(path).expanduser().absolute()
    return _resolved(path.parent) / path.name


def check_output(output: str | os.PathLike[str], inputs: Iterable[str | os.PathLike[str] | None] = (), *,
                 overwrite: bool = False, kind: str | None = None, what: str = "--output",
                 make_parents: bool = False) -> Path:
    """Validate an output path against the inputs (see the module docstring); nothing is created."""
    output = Path(output)
    target = _resolved(output)
    for item in inputs:
        if item is None:
            continue
        source = _resolved(item)
        if target == source:
            raise InputError(f"{what} is the input {item} ({output})",
                             hint="write to a new path; bitcpm never overwrites what it reads")
        if _within(target, source):
            raise InputError(f"{what} is inside the input {item} ({output})",
                             hint="write the output outside the input folder")
        if _within(source, target):
            raise InputError(f"the input is inside {what} ({item} is inside {output})",
                             hint="choose an output path that does not contain the inputs")
    if not make_parents and not output.parent.is_dir():
        raise InputError(f"the folder of {what} does not exist ({output.parent})", hint="create it first")
    writable_parent = next((p for p in [output.parent, *output.parent.parents] if p.exists()), None)
    if writable_parent is not None and not writable_parent.is_dir():
        raise InputError(f"cannot write {what} {output}: {writable_parent} is a file, not a folder",
                         hint="choose a path whose folders are folders")
    if writable_parent is not None and not os.access(writable_parent, os.W_OK):  # read-only mount or no permission
        raise InputError(f"cannot write {what} {output}: {writable_parent} is not writable (read-only file system or "
                         "no permission)", hint="choose a writable location; nothing was written")
    if output.exists() or output.is_symlink():
        special = special_kind(output)
        if special:
            raise InputError(f"{what} is {special}, not a {'folder' if kind == 'dir' else 'regular file'} ({output})",
                             hint="name a regular file or a new path; bitcpm never replaces a device, FIFO or socket")
        if kind == "file" and output.is_dir():
            raise InputError(f"{what} is a folder ({output})", hint="name a file, e.g. results.json")
        if kind == "dir" and not output.is_dir():
            raise InputError(f"{what} is a file ({output})", hint="name a folder")
        if not overwrite:
            raise InputError(f"{what} already exists ({output})", hint="choose a new path, or pass --overwrite")
    return output


def _remove(path: Path) -> None:
    """Remove what a run created, quietly: cleanup never raises (on a read-only file system even unlinking a path
    that is not there fails with EROFS, which would hide the error being reported)."""
    try:
        mode = os.lstat(path).st_mode
    except OSError:
        return
    if stat.S_ISDIR(mode):
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except OSError:
            pass


def _pid_of(name: str, prefix: str) -> int | None:
    match = re.match(re.escape(prefix) + r"(\d+)-", name)
    return int(match.group(1)) if match else None


def remove_stale(output: Path) -> list[Path]:
    """Staging paths and old copies of `output` left by writers whose pid is dead; returns what was removed."""
    removed = []
    try:
        siblings = list(output.parent.iterdir())
    except OSError:
        return removed
    for path in siblings:
        for prefix in (STAGING_PREFIX, OLD_PREFIX):
            pid = _pid_of(path.name, prefix)
            if pid is None or pid == os.getpid() or pid_alive(pid):
                continue
            rest = path.name[len(prefix) + len(str(pid)) + 1:]
            if rest == output.name or rest.startswith(output.name + "."):
                _remove(path)
                removed.append(path)
    return removed


class OutputGuard:
    """Claim, stage and commit one output; see the module docstring. Use as a context manager, or call
    `claim()` / `commit()` / `abort(exc)` explicitly where the write is spread over a function."""

    def __init__(self, output: str | os.PathLike[str], inputs: Iterable[str | os.PathLike[str] | None] = (), *,
                 overwrite: bool = False, kind: str | None = None, what: str = "--output", staged: bool = True,
                 keep_on_error: Callable[[Path], bool] | None = None):
        self.inputs = [i for i in inputs if i is not None]
        self.overwrite, self.kind, self.what, self.staged = overwrite, kind, what, staged
        self.keep_on_error = keep_on_error
        check_output(output, self.inputs, overwrite=overwrite, kind=kind, what=what, make_parents=not staged)
        self.output = anchored(output)
        self.shown = Path(output)  # as the user named it, for messages
        self.staging = self.output.parent / f"{STAGING_PREFIX}{os.getpid()}-{self.output.name}"
        self.claim_path = self.output.parent / f"{CLAIM_PREFIX}{self.output.name}"
        self._claim: Path | None = None
        self._created: list[Path] = []
        self._found: set[str] | None = None  # what an unstaged folder that already existed held when claimed
        self._scratch: list[Path] = []

    # ---- claiming -------------------------------------------------------------------------------------
    def claim(self) -> Path:
        """Take the output (exit 2 when another live run holds it) and return the path to write."""
        try:
            if not self.staged:
                self._make_parents()
            self._claim = self._take_claim()
            remove_stale(self.output)
            check_output(self.output, self.inputs, overwrite=self.overwrite, kind=self.kind, what=self.what,
                         make_parents=not self.staged)  # again, now that the output is ours
            if not self.staged and not self.output.exists():
                self.output.mkdir()
                self._created.append(self.output)
            elif not self.staged and self.output.is_dir():
                self._found = set(os.listdir(self.output))
        except BaseException as exc:
            self.abort(exc)
            raise
        return self.staging if self.staged else self.output

    def _make_parents(self) -> None:
        missing = [p for p in self.output.parents if not p.exists()]
        for parent in reversed(missing):
            parent.mkdir()
            self._created.append(parent)

    def _take_claim(self) -> Path:
        claim = self.claim_path
        # the claim appears with the pid already in it (a hard link of a finished pid file), so a concurrent run never
        # reads an empty claim and takes it for one left by a killed run
        pid_file = self.scratch_path("claim")
        _remove(pid_file)
        with os.fdopen(os.open(pid_file, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644), "w") as handle:
            handle.write(f"{os.getpid()}\n")
        try:
            return self._link_claim(pid_file, claim)
        finally:
            pid_file.unlink(missing_ok=True)

    def _link_claim(self, pid_file: Path, claim: Path) -> Path:
        for _ in range(3):
            try:
                os.link(pid_file, claim)
            except FileExistsError:
                try:
                    holder = int(claim.read_text().strip() or 0)
                except (OSError, ValueError):
                    holder = 0
                if holder and pid_alive(holder):
                    raise InputError(f"another bitcpm run (pid {holder}) is writing {self.shown}",
                                     hint="wait for it to finish, or choose another output path") from None
                claim.unlink(missing_ok=True)  # left by a killed run
                continue
            except OSError as exc:
                if exc.errno not in (errno.EPERM, errno.EXDEV, errno.EMLINK, errno.ENOTSUP):
                    raise
                # no hard links on this file system: exclusive create, then the pid (a short window)
                fd = os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                with os.fdopen(fd, "w") as handle:
                    handle.write(f"{os.getpid()}\n")
            return claim
        raise InputError(f"cannot claim {self.shown}: another run keeps taking it", hint="try again")

    def scratch_path(self, suffix: str) -> Path:
        """A pid-named path beside the output for an intermediate file: removed by commit() and abort(), and as
        stale by a later run when this one was killed; disk errors writing it are reported like the output's."""
        path = self.output.parent / f"{STAGING_PREFIX}{os.getpid()}-{self.output.name}.{suffix}"
        self._scratch.append(path)
        return path

    # ---- finishing --------------------------------------------------------------------------------------
    def commit(self) -> Path:
        """Move the staging path into place (never clobbering a path that appeared meanwhile) and release."""
        try:
            if self.staged:
                self._move_into_place()
        except BaseException as exc:
            self.abort(exc)
            raise
        for path in self._scratch:
            _remove(path)
        self._release()
        return self.output

    def _move_into_place(self) -> None:
        staging, output = self.staging, self.output
        if not (output.exists() or output.is_symlink()):
            if staging.is_dir():
                # the claim excludes other bitcpm writers; rename refuses a non-empty folder that appeared
                if output.exists():
                    raise FileExistsError(errno.EEXIST, "exists", str(output))
                os.rename(staging, output)
            else:
                try:
                    os.link(staging, output)  # atomic, fails if the output appeared meanwhile
                except FileExistsError:
                    raise InputError(f"{self.what} appeared while this run was writing it ({self.shown})",
                                     hint="choose a new path, or pass --overwrite") from None
                except OSError as exc:
                    if exc.errno not in (errno.EPERM, errno.EXDEV, errno.EMLINK, errno.ENOTSUP):
                        raise
                    os.rename(staging, output)  # no hard links here; the claim excludes other bitcpm writers
                staging.unlink(missing_ok=True)
            return
        if not self.overwrite:
            raise InputError(f"{self.what} appeared while this run was writing it ({self.shown})",
                             hint="choose a new path, or pass --overwrite")
        if staging.is_file() and output.is_file() and not output.is_symlink():
            os.replace(staging, output)
            return
        old = output.parent / f"{OLD_PREFIX}{os.getpid()}-{output.name}"
        _remove(old)
        os.rename(output, old)  # the old output goes only once the new one is complete
        os.rename(staging, output)
        _remove(old)

    def abort(self, exc: BaseException | None = None) -> None:
        """Remove everything this guard created; raise an InputError for a write refused by the disk."""
        _remove(self.staging)
        for path in self._scratch:
            _remove(path)
        keep = self.keep_on_error is not None and self.output.is_dir() and self.keep_on_error(self.output)
        if not keep:
            if self._found is not None and self.output.is_dir():  # a folder that was there: only what this run added
                try:
                    added = sorted(set(os.listdir(self.output)) - self._found)
                except OSError:
                    added = []
                for name in added:
                    _remove(self.output / name)
            for path in reversed(self._created):
                _remove(path)
        self._release()
        if isinstance(exc, OSError) and exc.errno in WRITE_ERRNOS and self._ours(exc):
            reason = exc.strerror or os.strerror(exc.errno)
            kept = ("; what it held that is complete is kept (e.g. checkpoints --resume continues from)" if keep
                    else "; nothing was written")
            raise InputError(f"cannot write {self.what} {self.shown}: {reason}",
                             hint="choose a writable location with enough free space" + kept) from None

    def _ours(self, exc: OSError) -> bool:
        if exc.filename is None:
            return exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS)
        path = Path(os.fsdecode(exc.filename)).absolute()
        roots = [self.staging, self.output, self.claim_path, *self._scratch, *self._created]
        return any(_within(path, root.absolute()) for root in roots) or path.name.startswith(OLD_PREFIX)

    def _release(self) -> None:
        if self._claim is not None:
            self._claim.unlink(missing_ok=True)
            self._claim = None

    def __enter__(self) -> Path:
        return self.claim()

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc is None:
            self.commit()
        else:
            self.abort(exc)
        return False


def write_text_output(text: str, output: str | os.PathLike[str], inputs: Iterable = (), *, overwrite: bool = False,
                      what: str = "--output") -> Path:
    """Write a small text output (a JSON report, a config) through the guard, fsynced before the rename."""
    with OutputGuard(output, inputs, overwrite=overwrite, kind="file", what=what) as staging:
        with open(staging, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
    return Path(output)


def check_output_path(output: str | Path, inputs: Iterable[str | Path | None] = (), overwrite: bool = False,
                      what: str = "--output") -> Path:
    """The output guard's checks (`OutputGuard`) for a JSON file, before any work is done."""
    return check_output(output, inputs, overwrite=overwrite, kind="file", what=what)


def write_json(document: dict[str, Any], output: str | Path, inputs: Iterable[str | Path | None] = (),
               overwrite: bool = False, what: str = "--output") -> None:
    """Write a JSON document through the output guard (claimed, staged, renamed into place; strict JSON)."""
    text = json.dumps(document, indent=2, ensure_ascii=False, allow_nan=False) + "\n"
    write_text_output(text, output, inputs, overwrite=overwrite, what=what)
