"""Test plugin: prompt sources that fail the way a bug and an exhausted machine do.

``--prompts bug:`` raises a KeyError inside the plugin (a bug: nothing the user typed is wrong);
``--prompts oom:`` asks torch's CPU allocator for an exbibyte, which fails with torch's own
out-of-memory error.  tests/test_exit_codes.py installs it through an entry point of group ``resp``
(or registers it with the plugin manager), as a third-party package would be.
"""

from __future__ import annotations

from typing import Any

from resp_plugin.hookspecs import hookimpl


def _bug(arg: str | None, config: Any = None) -> list:
    return {}["prompts"]  # a KeyError: the plugin's own mistake


def _out_of_memory(arg: str | None, config: Any = None) -> list:
    import torch

    return [torch.empty(1 << 60, dtype=torch.uint8)]  # 1 EiB: torch's allocator refuses it at once


@hookimpl
def resp_prompt_sources(register) -> None:
    register("bug", _bug)
    register("oom", _out_of_memory)
