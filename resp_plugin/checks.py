"""Checks of inputs that every entry point shares: output folders, tokenizers, HTTP endpoints.

Why here and not where each is used: ``resp prune``, ``resp eval``, ``resp demo``, ``prune()``
and the llm-compressor modifier must refuse the same bad input with the same sentence, before any
work starts, so a refused run leaves nothing behind.  Each check raises a
:class:`~resp_plugin.errors.UserError` subclass naming the fix.

Nothing heavy is imported here: the command line runs these checks before torch loads.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from resp_plugin.errors import ConfigError, UserError, one_line


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


def batch_size(text: str) -> int | str:
    """An argparse ``type`` for lm-eval's batch size: a positive integer, ``auto`` or ``auto:N``.

    Checked where the flag is read: lm-eval would otherwise fail with a bare ``int()`` error
    after the model has loaded.
    """
    import argparse

    if text == "auto" or (text.startswith("auto:") and text[5:].isdigit() and int(text[5:]) > 0):
        return text
    if text.isdigit() and int(text) > 0:
        return int(text)
    raise argparse.ArgumentTypeError(f"must be a positive integer, auto or auto:N, got {text!r}")


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


# ----------------------------------------------------------------------------- tokenizer
def check_tokenizer(tokenizer: Any, config: Any = None, where: str = "the tokenizer") -> None:
    """Refuse an empty tokenizer, and one without a chat template when thinking is asked for.

    An empty tokenizer (a model folder without tokenizer files loads as one) otherwise surfaces
    much later as "no calibration sample has a token to score".
    """
    if tokenizer is None:
        raise ConfigError("no tokenizer given; pass the model's tokenizer (AutoTokenizer.from_pretrained(PATH))")
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
    import urllib.error  # here: urllib.request pulls in ssl and http, which no other check needs
    import urllib.parse
    import urllib.request

    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{what} URL {url!r} is not an http(s) URL; give it as http://HOST:PORT/PATH")
    try:
        parts.port  # noqa: B018 (raises on a bad port)
    except ValueError:
        raise ConfigError(f"{what} URL {url!r} has an invalid port; give it as http://HOST:PORT/PATH") from None
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
