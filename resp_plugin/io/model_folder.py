"""Checks of a model folder from its files alone, before any loading.

A wrong path or a damaged copy must be one clear error naming the fix, in milliseconds, not a
hub lookup ("Repo id must be in the form ...") or a deserialisation traceback minutes later.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from resp_plugin.errors import InputDataError, InputNotFound, UserError

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def _damaged(path: Path, why: str) -> Exception:
    return InputDataError(f"{path} is damaged ({why}); copy or download the checkpoint again")


def _check_safetensors(path: Path) -> None:
    """Read only the header: a truncated or overwritten file is refused before any loading."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n <= 0 or 8 + n > size:
            raise _damaged(path, f"invalid header length, file of {size} bytes")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise _damaged(path, f"unreadable header: {e}") from None
    try:
        ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
    except (AttributeError, KeyError, IndexError, TypeError, ValueError) as e:
        raise _damaged(path, f"unreadable header entry: {e!r}") from None
    if 8 + n + max(ends, default=0) > size:
        raise _damaged(path, f"truncated: {size} bytes, the header needs {8 + n + max(ends)}")


def _check_weights(p: Path) -> None:
    """The weight files exist and, for safetensors, are whole; shards of an index included."""
    found = [p / name for name in WEIGHT_FILES if (p / name).is_file()]
    if not found:
        raise InputNotFound(f"{p} holds config.json but no weights ({', '.join(WEIGHT_FILES[::2])}); "
                            "copy the weight files into it")
    for f in found:
        if f.name.endswith(".index.json"):
            try:
                shards = sorted(set(json.loads(f.read_text())["weight_map"].values()))
            except (ValueError, KeyError, AttributeError) as e:
                raise _damaged(f, f"not a weight index: {e}") from None
            missing = [s for s in shards if not (p / s).is_file()]
            if missing:
                raise InputNotFound(f"{f} names {len(missing)} missing shard(s), first {missing[0]}; "
                                    "copy every shard into the model folder")
            files = [p / s for s in shards]
        else:
            files = [f]
        for w in files:
            if w.suffix == ".safetensors":
                _check_safetensors(w)


def check_model_dir(path: str | Path) -> Path:
    """Refuse a model folder that cannot load: missing, a file, no or bad config.json, no or damaged weights.

    Checked from the files alone (headers, not tensors), so a bad path fails in milliseconds
    instead of as a hub lookup ("Repo id must be in the form ...") or a deserialisation traceback.
    """
    p = Path(path)
    hint = "resp works offline on local checkpoints: download the model first or pass its local path"
    if not p.exists():
        raise InputNotFound(f"model folder {p} does not exist; {hint}")
    if not p.is_dir():
        raise UserError(f"{p} is a file, not a model folder; pass the folder that holds config.json")
    if not os.access(p, os.R_OK | os.X_OK):
        raise UserError(f"model folder {p} is not readable; fix its permissions (chmod +rx)")
    if not (p / "config.json").is_file():
        raise InputNotFound(f"{p} is not a model folder (no config.json); {hint}")
    try:
        json.loads((p / "config.json").read_text())
    except (ValueError, OSError) as e:
        raise _damaged(p / "config.json", f"not valid JSON: {e}") from None
    _check_weights(p)
    return p
