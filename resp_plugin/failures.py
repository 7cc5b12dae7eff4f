"""How the ``resp`` command reports a failure: one line on stderr, an exit code, a log file.

Why a module of its own: the rule is the same for every subcommand and must not depend on which
exception a library happens to raise.  A :class:`~resp_plugin.errors.UserError` is the user's to
fix: its one line, exit code 2, nothing written.  Everything else exits 1 with one line naming a
log file that holds the full traceback (``OUT/error.log`` for a command with a run folder), so a
bug report carries what is needed; an out-of-memory error names the flags of that command that
lower memory, a lost rank or a full disk says what happened.  ``--debug`` (``-v``,
``RESP_DEBUG=1``) also prints the traceback on stderr.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from resp_plugin.errors import RunAborted, UserError, is_environment_failure, is_out_of_memory, one_line

EXIT_FAILURE, EXIT_USER, EXIT_INTERRUPTED = 1, UserError.exit_code, 130
LOG_NAME = "error.log"
_MAX_MESSAGE = 300  # characters of a foreign exception's message kept on the one line

# What lowers memory, per subcommand: only that command's own flags (tests/test_exit_codes.py
# checks every --flag named here against the parser).
MEMORY_KNOBS: dict[str, tuple[str, ...]] = {
    "prune": ("--gradient-checkpointing", "--score-chunks 4 (or more)", "--saliency vector",
              "--fsdp under torchrun", "a smaller --batch-size, --generation-batch-size or --max-seq-len"),
    "recover": ("--recovery-gradient-checkpointing", "--recovery-lora-rank 16",
                "a smaller --recovery-batch-size with a larger --recovery-gradient-accumulation"),
    "eval": ("a smaller --batch-size or --max-gen-toks", "--dtype bfloat16"),
    "reproduce": ("a smaller --batch-size or --max-gen-toks",
                  "in --config: gradient_checkpointing: true, score_chunks: 4, saliency: vector"),
    "demo": ("--quick",),
}


def handle(exc: BaseException, args: Any, argv: list[str], debug: bool) -> int:
    """Report ``exc`` raised by the command ``args`` on stderr; returns the exit code."""
    if debug:
        traceback.print_exception(exc, file=sys.stderr)
    if isinstance(exc, KeyboardInterrupt):
        _say("interrupted; a resp prune run continues with --resume")
        return EXIT_INTERRUPTED
    if isinstance(exc, UserError):
        _say(f"error: {one_line(exc)}")
        return EXIT_USER
    log = write_log(exc, args, argv)
    if is_out_of_memory(exc):
        knobs = "; ".join(MEMORY_KNOBS.get(getattr(args, "command", ""), ())) or "smaller batches or shorter sequences"
        _say(f"out of memory ({_short(exc)}); to use less memory: {knobs}. Traceback in {log}")
    elif isinstance(exc, RunAborted):  # our own sentence, ending in how to continue: never cut
        _say(f"error: {one_line(exc)} (traceback in {log})")
    elif is_environment_failure(exc):
        _say(f"error: {_short(exc)} (traceback in {log})")
    else:
        _say(f"internal error: {type(exc).__name__}: {_short(exc)}; this is a bug, not a wrong input: please "
             f"report it with {log}, which holds the traceback")
    return EXIT_FAILURE


def _say(line: str) -> None:
    print(f"resp: {line}", file=sys.stderr)


def _short(exc: BaseException) -> str:
    text = one_line(exc)
    return text if len(text) <= _MAX_MESSAGE else text[: _MAX_MESSAGE - 1] + "…"


def run_folder_of(args: Any) -> Path | None:
    """The folder the command writes into (``--out``, ``resp eval --output-path``), if it has one."""
    out = getattr(args, "out", None) or getattr(args, "output_path", None)
    if not out:
        return None
    out = Path(out)
    return out.parent if out.suffix == ".json" else out


def _log_name() -> str:
    """Under torchrun every rank logs its own failure; rank 0's is ``error.log``."""
    rank = os.environ.get("RANK") or "0"
    return LOG_NAME if rank == "0" else f"error-rank{rank}.log"


def write_log(exc: BaseException, args: Any, argv: list[str]) -> Path:
    """Append the failure (command, versions, full traceback) to the run folder's log; returns its path.

    A command without a run folder, or whose folder cannot be written, logs to the temporary folder.
    """
    text = _log_text(exc, argv)
    folder = run_folder_of(args)
    candidates = [folder / _log_name()] if folder is not None else []
    candidates.append(Path(tempfile.gettempdir()) / f"resp-error-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log")
    for path in candidates:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a") as f:
                f.write(text)
            return path
        except OSError:
            continue
    return Path("(no writable folder for the log)")


def _log_text(exc: BaseException, argv: list[str]) -> str:
    versions = [f"python {sys.version.split()[0]}"]
    for name in ("resp_plugin", "torch", "transformers"):
        module = sys.modules.get(name)
        version = getattr(module, "__version__", None)
        if version:
            versions.append(f"{name} {version}")
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    head = f"==== {stamp}: resp {' '.join(argv)} failed (pid {os.getpid()}; {', '.join(versions)})\n"
    return head + "".join(traceback.format_exception(exc)) + "\n"
