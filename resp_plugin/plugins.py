"""The plugin manager: the core's built-ins, then the entry points of group ``resp``, loaded once, lazily.

The core registers only its own built-ins (:data:`DEFAULT_PLUGINS`).  The integrations shipped in
this distribution (lm-eval prompt source and task folder, the vLLM generation backend) come in
through ``[project.entry-points.resp]`` of its ``pyproject.toml``, the route a third-party package
takes, so the core never imports them.

Precedence, one rule for every hook: **the plugin registered last wins**.  Built-ins are
registered first, then this distribution's own entry points (its integrations), then those of
other packages, so an installed plugin overrides a built-in of the same name.  (pluggy calls
implementations last-registered first; :func:`collect` keeps the first value it hears for a
name.)  The llm-compressor modifier, whose module is imported only by llm-compressor users, is
no hook: :func:`resp_plugin.integrations.llmcompressor.register_modifiers` falls back to it.

Set ``RESP_DISABLE_ENTRYPOINTS=1`` to load only this distribution's own plugins (its built-ins and
the integrations its ``pyproject.toml`` declares), never those of other installed packages: tests
then run the same whatever else is installed.
"""

from __future__ import annotations

import importlib
import os
from importlib.metadata import EntryPoint, entry_points
from typing import Any

import pluggy

from resp_plugin import hookspecs

DIST_NAME = "resp-plugin"
ENTRY_POINT_GROUP = "resp"
DEFAULT_PLUGINS: tuple[str, ...] = (
    "resp_plugin.structures.builtin",
    "resp_plugin.calibration.builtin",
)

pm = pluggy.PluginManager("resp")
pm.add_hookspecs(hookspecs)
_loaded = False


def _is_own(ep: EntryPoint) -> bool:
    """Whether an entry point is declared by this distribution (not a third-party package)."""
    dist = getattr(ep, "dist", None)
    return dist is not None and dist.name.replace("_", "-").lower() == DIST_NAME


def load_plugins() -> pluggy.PluginManager:
    """Register the built-in plugins, then the installed ``resp`` entry points (once)."""
    global _loaded
    if _loaded:
        return pm
    _loaded = True
    for name in DEFAULT_PLUGINS:
        pm.register(importlib.import_module(name), name=name)
    own_only = bool(os.environ.get("RESP_DISABLE_ENTRYPOINTS"))
    # this distribution's integrations first: another package's plugin of the same name then wins
    for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: not _is_own(ep)):
        if (own_only and not _is_own(ep)) or pm.get_plugin(ep.name) is not None or pm.is_blocked(ep.name):
            continue
        plugin = ep.load()
        if not pm.is_registered(plugin):  # e.g. already registered by hand, under another name
            pm.register(plugin, name=ep.name)
    return pm


def collect(hook_name: str) -> dict[str, Any]:
    """Call a ``register``-style hook and return what the plugins registered, by name.

    The plugin registered last wins a name (see the module docstring): pluggy calls it first and
    the first value registered for a name is kept.
    """
    load_plugins()
    found: dict[str, Any] = {}

    def register(name: str, value: Any) -> None:
        found.setdefault(name, value)

    getattr(pm.hook, hook_name)(register=register)
    return found
