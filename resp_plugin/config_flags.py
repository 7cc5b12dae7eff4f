"""``resp prune``'s configuration flags, generated from :class:`~resp_plugin.config.RESPConfig`.

The config is the one source of truth: every field becomes a flag with its type, its choices
(``Literal`` fields), its description and its default, so a field added to the config is on the
command line at once and the two can never disagree.  ``generation.*`` fields are flattened
(``--temperature``); a name both levels use gets a ``generation-`` prefix
(``--generation-batch-size``).  ``recovery.*`` fields always carry a ``recovery-`` prefix
(``--recovery-lr``), except ``recovery.enabled``, which is ``--recover``.  Flags left out do not
override ``--config`` nor the defaults.
"""

from __future__ import annotations

import argparse
import types
import typing
from typing import Any, Literal

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from resp_plugin.config import GenerationConfig, RecoveryConfig, RESPConfig
from resp_plugin.errors import ConfigError

NESTED = "generation"  # the RESPConfig field holding GenerationConfig (flattened)
PREFIXED = "recovery"  # the RESPConfig field holding RecoveryConfig (--recovery-NAME)
SUBMODELS: dict[str, type[BaseModel]] = {NESTED: GenerationConfig, PREFIXED: RecoveryConfig}
RENAMED = {(PREFIXED, "enabled"): "recover"}


def comma_floats(text: str) -> list[float]:
    """``"0.2,0.3"`` -> ``[0.2, 0.3]`` (an empty text is an empty list)."""
    return [float(x) for x in text.split(",") if x.strip()]


def comma_ints(text: str) -> list[int]:
    """``"0,35"`` -> ``[0, 35]``; ``""`` -> ``[]`` (e.g. ``--protected-layers ''``: none)."""
    return [int(x) for x in text.split(",") if x.strip()]


def flag_names() -> dict[tuple[str, ...], str]:
    """Config path (``("step",)``, ``("generation", "temperature")``) -> argparse dest name."""
    top = [name for name in RESPConfig.model_fields if name not in SUBMODELS]  # in the config's order
    names: dict[tuple[str, ...], str] = {(name,): name for name in top}
    for name in GenerationConfig.model_fields:
        names[(NESTED, name)] = f"{NESTED}_{name}" if name in top else name
    for name in RecoveryConfig.model_fields:
        names[(PREFIXED, name)] = RENAMED.get((PREFIXED, name), f"{PREFIXED}_{name}")
    return names


def _field(path: tuple[str, ...]) -> FieldInfo:
    model: type[BaseModel] = SUBMODELS[path[0]] if len(path) > 1 else RESPConfig
    return model.model_fields[path[-1]]


def _bare(annotation: Any) -> Any:
    """``X | None`` -> ``X``: an absent flag is expressed by argparse's None, not by the type."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0] if len(args) == 1 else str
    return annotation


def _argument(info: FieldInfo) -> dict[str, Any]:
    """argparse keywords for one field: its type, its choices and its help with the default."""
    kind = _bare(info.annotation)
    default = "required" if info.is_required() else info.get_default(call_default_factory=True)
    shown = "" if default is None else f" (default: {default})"
    text = f"{info.description or ''}{shown}".strip().replace("%", "%%")  # argparse formats help
    if kind is bool:
        return {"action": argparse.BooleanOptionalAction, "help": text}
    if typing.get_origin(kind) is Literal:
        return {"choices": list(typing.get_args(kind)), "help": text}
    if typing.get_origin(kind) is list:
        item = typing.get_args(kind)[0]
        return {"type": comma_floats if item is float else comma_ints, "metavar": "A,B,...", "help": text}
    return {"type": kind if kind in (int, float) else str, "help": text}


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """Add one flag per configuration field (``--config`` FILE of fields and the flags override it)."""
    group = parser.add_argument_group("RESP configuration (fields of RESPConfig; docs/calibration.md, "
                                      "docs/protocol.md)")
    for path, dest in flag_names().items():
        group.add_argument(f"--{dest.replace('_', '-')}", dest=dest, default=None, **_argument(_field(path)))


def config_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The fields the user gave on the command line, nested as RESPConfig reads them."""
    data: dict[str, Any] = {}
    for path, dest in flag_names().items():
        value = getattr(args, dest, None)
        if value is None:
            continue
        target = data.setdefault(path[0], {}) if len(path) > 1 else data
        target[path[-1]] = value
    return data


def config_from_args(args: argparse.Namespace, config_file: str | None = None) -> RESPConfig:
    """RESPConfig from ``--config FILE`` (when given) with the command line's fields over it."""
    given = config_overrides(args)
    if config_file is None:
        if "sparsity" not in given:
            raise ConfigError("--sparsity is required (or give it in --config)")
        return RESPConfig.from_settings(given)
    base = RESPConfig.from_file(config_file).model_dump()
    for nested in SUBMODELS:
        base[nested].update(given.pop(nested, {}))
    base.update(given)
    return RESPConfig.from_settings(base)
