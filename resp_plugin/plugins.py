"""The plugin manager: built-ins and entry points of group ``resp``, loaded once, lazily.

Set ``RESP_DISABLE_ENTRYPOINTS=1`` to load only the built-ins (useful in tests).
"""

from __future__ import annotations

import importlib
import os
from typing import Any

import pluggy

from resp_plugin import hookspecs

DEFAULT_PLUGINS: tuple[str, ...] = (
    "resp_plugin.structures.builtin",
    "resp_plugin.calibration.builtin",
    # Thin adapters: importing them is cheap; lm_eval itself is imported only when used.
    "resp_plugin.integrations.lm_eval",
)

pm = pluggy.PluginManager("resp")
pm.add_hookspecs(hookspecs)
_loaded = False


def load_plugins() -> pluggy.PluginManager:
    """Register the built-in plugins and the installed ``resp`` entry points (once)."""
    global _loaded
    if _loaded:
        return pm
    _loaded = True
    for name in DEFAULT_PLUGINS:
        pm.register(importlib.import_module(name), name=name)
    if not os.environ.get("RESP_DISABLE_ENTRYPOINTS"):
        pm.load_setuptools_entrypoints("resp")
    return pm


def collect(hook_name: str) -> dict[str, Any]:
    """Call a ``register``-style hook and return what the plugins registered, by name.

    Later registrations win, so a third-party plugin can override a built-in.
    """
    load_plugins()
    found: dict[str, Any] = {}

    def register(name: str, value: Any) -> None:
        # pluggy calls the most recently registered plugin first: the first registration wins.
        found.setdefault(name, value)

    getattr(pm.hook, hook_name)(register=register)
    return found
