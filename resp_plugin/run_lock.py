"""The run-folder lock: two runs never write one run folder, and a refused run leaves none behind.

Why a lock file and not a check of the folder's contents: a run killed with ``kill -9`` must be
resumable at once, so the lock must vanish with its process; ``fcntl.flock`` is dropped by the
kernel when the holder dies.  Whoever runs in a folder takes the lock by an explicit call,
``with run_folder(out):`` (``prune()``, ``resp demo``, ``resp recover``); the command line can
also refuse a locked folder before it loads a model (:func:`check_unlocked`).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from resp_plugin.checks import check_out_dir
from resp_plugin.errors import RunFolderInUse

try:  # POSIX only; elsewhere runs are not locked
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

LOCK_FILE = ".lock"
# Files a run writes before it has anything worth resuming: a run that fails with only these
# in a folder it created removes the folder again.
_NO_PROGRESS = {"config.yaml"}
_HELD: dict[Path, int] = {}  # lock path -> fd: this process may re-enter its own run


def _lock_path(out: Path) -> Path:
    """Absolute, so that one process re-enters its own lock however the folder was spelled."""
    return out.resolve() / LOCK_FILE


def _is_main_rank() -> bool:
    """Under torchrun only rank 0 writes (and so locks) the run folder (resp_plugin.distributed)."""
    return (os.environ.get("RANK") or "0") == "0"


def _locked_error(path: Path, fd: int) -> RunFolderInUse:
    holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown pid"
    return RunFolderInUse(f"{path.parent} is in use by another resp run ({holder}); wait for it to end, "
                          "or choose another out folder (--out)")


def _acquire(path: Path) -> int:
    """flock ``path`` without waiting; the file is re-opened if its holder removed it meanwhile."""
    while True:
        fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            err = _locked_error(path, fd)
            os.close(fd)
            raise err from None
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()}\n".encode(), 0)
            return fd
        os.close(fd)


def check_unlocked(out: str | Path) -> None:
    """Refuse now (before loading a model) a run folder another process is running in."""
    path = _lock_path(Path(out))
    if fcntl is None or path in _HELD or not _is_main_rank() or not path.is_file():
        return
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise _locked_error(path, fd) from None
    finally:
        os.close(fd)  # closing also drops a lock taken here


def _has_progress(out: Path) -> bool:
    """Whether ``out`` holds anything a resumed run would reuse (state, traces, a model)."""
    return any(p.name not in _NO_PROGRESS and not p.name.startswith(LOCK_FILE) for p in out.iterdir())


@contextmanager
def run_folder(out: str | Path | None) -> Iterator[None]:
    """Hold ``OUT/.lock`` for the duration of a run; the lock file goes when the run ends.

    A run that fails in a folder it created, before writing anything resumable, removes the
    folder again: a refused run leaves no output behind.  Re-entrant within one process
    (``resp demo`` holds the lock and calls ``prune()`` on the same folder).
    """
    if out is None:
        yield
        return
    out = check_out_dir(out)
    path = _lock_path(out)
    if fcntl is None or path in _HELD or not _is_main_rank():
        yield
        return
    created = next((p for p in reversed([out, *out.parents]) if not p.exists()), None)
    out.mkdir(parents=True, exist_ok=True)
    try:
        _HELD[path] = _acquire(path)
    except BaseException:
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        raise
    try:
        yield
    except BaseException:
        if created is not None and not _has_progress(out):
            shutil.rmtree(created, ignore_errors=True)
        raise
    finally:
        fd = _HELD.pop(path)
        path.unlink(missing_ok=True)
        os.close(fd)
