"""The error types of resp-plugin, and how a failure is told apart: the user's, the machine's, a bug.

Why types of their own: the command line must tell a mistake the user can fix (one line, exit
code 2, no traceback) from everything else (exit code 1, the traceback kept in a log file), and
it can only do that by type, never by guessing from a built-in exception (a ``ValueError`` or an
``OSError`` raised deep inside torch is a bug, not a bad flag).  So every check of an input raises
a :class:`UserError` subclass at the place the input is read, and the library's callers
(``prune()``, ``load_pruned()``, the llm-compressor modifier) get the same one-line sentence as
an exception.  The subclasses that stand for a missing or existing path are also
``FileNotFoundError`` / ``FileExistsError``, so callers that caught those keep working.

The checks themselves live in :mod:`resp_plugin.checks`, the run-folder lock in
:mod:`resp_plugin.run_lock`, and the command line's reporting in :mod:`resp_plugin.failures`.
Nothing heavy is imported here: the command line imports this module before torch loads.
"""

from __future__ import annotations

import difflib
import errno
import os
import sys
from collections.abc import Iterable, Iterator

DEBUG_ENV = "RESP_DEBUG"


class UserError(ValueError):
    """A bad input the user can fix; the message is one line naming the fix.

    A ValueError, so callers that already caught ValueError for bad input keep working.
    """

    exit_code = 2


class ConfigError(UserError):
    """A setting (flag, config file field, API argument) that cannot work, alone or with this model."""


class InputNotFound(UserError, FileNotFoundError):
    """A path the user gave (model folder, prompts, config file, report) does not exist."""


class InputDataError(UserError):
    """A file the user gave exists but its content is wrong or damaged (JSON, traces, a checkpoint)."""


class UnsupportedModel(UserError):
    """The model cannot be pruned or served as it is (architecture, quantised, weight layout)."""


class OutputExists(UserError, FileExistsError):
    """The run would overwrite a result (``OUT/model``, a finished recovery) without being asked to."""


class RunFolderInUse(UserError):
    """Another resp run holds the run folder's lock."""


class MissingDependency(UserError):
    """An optional package the asked-for feature needs is not installed."""


class NumericsError(UserError, FloatingPointError):
    """The model overflows on the calibration data in this dtype (non-finite loss or saliency)."""


class RunAborted(RuntimeError):
    """The run stopped for a reason outside it (another rank died): not a bug, not a bad input.

    Exit code 1 like a bug, but its message is shown as it is: it says how to continue.
    """


# Errors of the machine, not of resp: a full or read-only disk, a failing device.
_ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO}


def causes(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and the exceptions it was raised from or during, outermost first."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` (or what it was raised from) is an out-of-memory error of torch or Python.

    torch raises ``torch.OutOfMemoryError`` for CUDA, a plain ``RuntimeError`` from its CPU
    allocator and other backends; the message is the only mark those carry.
    """
    torch = sys.modules.get("torch")
    oom_type = getattr(torch, "OutOfMemoryError", None) if torch is not None else None
    for e in causes(exc):
        if isinstance(e, MemoryError) or (oom_type is not None and isinstance(e, oom_type)):
            return True
        text = str(e).lower()
        if isinstance(e, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text):
            return True
    return False


def is_environment_failure(exc: BaseException) -> bool:
    """A failure of the machine or the job rather than of resp: a lost rank, a full disk."""
    return isinstance(exc, RunAborted) or (isinstance(exc, OSError) and exc.errno in _ENVIRONMENT_ERRNOS)


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
