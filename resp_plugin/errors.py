"""User errors: one line that says what is wrong and how to fix it, for every entry point.

Why a type of its own: the command line must tell a mistake the user can fix (one line, exit
code 2, no traceback) from a bug (where the traceback is what helps), and library callers
(``prune()``, ``load_pruned()``, the llm-compressor modifier) get the same sentence as an
exception.  The checks here run before any work starts, so a refused run leaves nothing behind;
:func:`run_folder` also holds ``OUT/.lock`` so that two runs never write one run folder.

Nothing heavy is imported here: the command line reads these checks before torch loads.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import os
import shutil
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

try:  # POSIX only; elsewhere runs are not locked
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

DEBUG_ENV = "RESP_DEBUG"
LOCK_FILE = ".lock"
# Files a run writes before it has anything worth resuming: a run that fails with only these
# in a folder it created removes the folder again.
_NO_PROGRESS = {"config.yaml"}


class UserError(ValueError):
    """A bad input the user can fix; the message is one line naming the fix.

    A ValueError, so callers that already caught ValueError for bad input keep working.
    """

    exit_code = 2


def debug_enabled(flag: bool = False) -> bool:
    """True with ``--debug`` / ``-v`` or ``RESP_DEBUG=1``: then errors show their traceback."""
    return flag or os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def one_line(exc: BaseException) -> str:
    """The message of ``exc`` on one line (pydantic's multi-line reports joined with '; ')."""
    from pydantic import ValidationError

    if isinstance(exc, ValidationError):
        text = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'config'}: {e['msg']}" for e in exc.errors())
    elif isinstance(exc, KeyError) and exc.args:
        text = str(exc.args[0])
    else:
        text = str(exc) or type(exc).__name__
    return " ".join(text.split())


def did_you_mean(name: str, known: Iterable[str], n: int = 3) -> str:
    """' (did you mean a, b?)' for the closest known names, or '' when none is close."""
    matches = difflib.get_close_matches(name, sorted(set(known)), n=n, cutoff=0.6)
    return f" (did you mean {', '.join(matches)}?)" if matches else ""


def positive_int(text: str) -> int:
    """An argparse ``type`` refusing 0 and negatives (``--limit 0`` would evaluate nothing)."""
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


# ----------------------------------------------------------------------------- output paths
def _blocking_file(path: Path) -> Path | None:
    """The first existing ancestor of ``path`` (itself included) that is not a folder."""
    for p in (path, *path.parents):
        if p.exists():
            return None if p.is_dir() else p
    return None


def check_out_dir(out: str | Path, flag: str = "--out") -> Path:
    """Refuse a run folder that is a file, or lies under one, or under a read-only folder."""
    out = Path(out)
    blocker = _blocking_file(out)
    if blocker == out:
        raise UserError(f"{flag} {out} is a file, not a folder; give a folder path (it is created if missing)")
    if blocker is not None:
        raise UserError(f"{flag} {out} cannot be created: {blocker} is a file; give a folder path")
    parent = next(p for p in (out, *out.parents) if p.exists())
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {out} cannot be written: {parent} is not writable; choose another folder")
    return out


def check_out_file(out: str | Path, flag: str = "--out") -> Path:
    """Refuse a results file path that is a folder or lies under a file."""
    out = Path(out)
    if out.is_dir():
        raise UserError(f"{flag} {out} is a folder; give the path of the results JSON file, e.g. {out}/results.json")
    check_out_dir(out.parent, flag=f"the folder of {flag}")
    return out


# ----------------------------------------------------------------------------- run lock
_HELD: dict[Path, int] = {}  # lock path -> fd: this process may re-enter its own run


def _lock_path(out: Path) -> Path:
    """Absolute, so that one process re-enters its own lock however the folder was spelled."""
    return out.resolve() / LOCK_FILE


def _is_main_rank() -> bool:
    """Under torchrun only rank 0 writes (and so locks) the run folder (resp_plugin.distributed)."""
    return (os.environ.get("RANK") or "0") == "0"


def _locked_error(path: Path, fd: int) -> UserError:
    holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown pid"
    return UserError(f"{path.parent} is in use by another resp run ({holder}); wait for it to end, "
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


def guarded_run(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate ``prune()``: check its tokenizer, then run it holding ``out``'s lock.

    A decorator rather than a call inside ``prune()``: the lock must be released however the
    run ends, and a ``with`` around the whole loop would re-indent it.
    """
    sig = inspect.signature(fn)

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        bound = sig.bind_partial(*args, **kwargs).arguments
        check_tokenizer(bound.get("tokenizer"), bound.get("config"))
        with run_folder(bound.get("out")):
            return fn(*args, **kwargs)

    return run


# ----------------------------------------------------------------------------- tokenizer
def check_tokenizer(tokenizer: Any, config: Any = None, where: str = "the tokenizer") -> None:
    """Refuse an empty tokenizer, and one without a chat template when thinking is asked for.

    An empty tokenizer (a model folder without tokenizer files loads as one) otherwise surfaces
    much later as "no calibration sample has a token to score".
    """
    if tokenizer is None:
        raise UserError("no tokenizer given; pass the model's tokenizer (AutoTokenizer.from_pretrained(PATH))")
    try:
        size = len(tokenizer)
    except TypeError:
        return
    if size < 2:
        raise UserError(f"{where} is empty (no tokenizer files: tokenizer.json, tokenizer.model or vocab.json); "
                        "copy the tokenizer files of the base model into the model folder")
    if config is None or getattr(config, "calibration", None) not in ("self", "gold"):
        return
    if config.generation.thinking and not getattr(tokenizer, "chat_template", None):
        raise UserError(f"{where} has no chat template, so thinking cannot be switched on; use a chat/reasoning "
                        "model's tokenizer (chat_template.jinja), or pass --no-thinking (generation.thinking: false)")


# ----------------------------------------------------------------------------- endpoints
def check_endpoint(url: str, what: str, *, timeout: float = 5.0, fix: str | None = None) -> str:
    """Refuse an HTTP endpoint (judge, server) that is malformed or does not answer; returns ``url``.

    Any HTTP answer counts, an error status included (``/v1`` of an OpenAI-compatible server
    answers 404): only a server that cannot be reached is refused, before any work waits on it.
    """
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UserError(f"{what} URL {url!r} is not an http(s) URL; give it as http://HOST:PORT/PATH")
    try:
        parts.port  # noqa: B018 (raises on a bad port)
    except ValueError:
        raise UserError(f"{what} URL {url!r} has an invalid port; give it as http://HOST:PORT/PATH") from None
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="GET"), timeout=timeout):
            pass
    except urllib.error.HTTPError:
        pass  # it answered
    except (urllib.error.URLError, OSError) as e:
        reason = one_line(getattr(e, "reason", e) if isinstance(e, urllib.error.URLError) else e)
        raise UserError(f"{what} at {url} does not answer ({reason}); "
                        f"{fix or 'start it, or check the host and port'}") from None
    return url
