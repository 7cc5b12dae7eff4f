"""Saving and loading pruned checkpoints that reload with standard tools.

A pruned checkpoint is an ordinary transformers checkpoint plus (a) the per-layer sizes in
``config.json``'s ``per_layer_config`` and (b) ``modeling_resp.py`` named in ``auto_map``,
so ``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`` rebuilds the
smaller layers; :func:`load_pruned` does the same without remote code; and (c) ``RESP<Arch>``
in ``architectures``, the name under which the RESP vLLM plugin serves it (docs/serving.md).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from loguru import logger

from resp_plugin.structures import modeling_resp
from resp_plugin.structures.layout import pruned_architecture_name

MODELING_FILE = "modeling_resp.py"
KEPT_FILE = "resp_pruning.json"


def atomic_write_text(path: Path, text: str) -> None:
    """Write via a temp file in the same folder and rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def auto_map_for(model_type: str) -> dict[str, str] | None:
    cls = modeling_resp.RESP_CLASSES.get(model_type)
    if cls is None:
        return None
    return {"AutoModelForCausalLM": f"{Path(MODELING_FILE).stem}.{cls.__name__}"}


def pruned_config_fields(model) -> dict[str, Any]:
    """The fields a pruned checkpoint's config.json must carry (written back after foreign saves)."""
    cfg = model.config.to_dict()
    fields: dict[str, Any] = {}
    if "per_layer_config" in cfg:
        fields["per_layer_config"] = cfg["per_layer_config"]
    amap = auto_map_for(model.config.model_type)
    if amap and "per_layer_config" in fields:
        fields["auto_map"] = amap
        fields["architectures"] = [pruned_architecture_name(type(model).__name__)]
    return fields


def finalize_checkpoint(path: str | Path, model, kept: list[dict] | None = None) -> None:
    """Make a saved directory reload as a pruned model: restore config fields, copy modeling file.

    Needed after savers that rewrite config.json from the original config (llm-compressor).
    """
    path = Path(path)
    fields = pruned_config_fields(model)
    if not fields:
        return
    cfg_path = path / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(fields)
    atomic_write_json(cfg_path, cfg)
    shutil.copyfile(modeling_resp.__file__, path / MODELING_FILE)
    if kept is not None:
        atomic_write_json(path / KEPT_FILE, {"layers": kept})


def save_pruned(model, tokenizer, path: str | Path, adapter=None, overwrite: bool = False) -> Path:
    """Save atomically: everything goes to a temp folder renamed into place at the end."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; pass --overwrite (or --resume) to replace it")
    if adapter is not None:
        adapter.write_config()
    amap = auto_map_for(model.config.model_type)
    if amap is None:
        logger.warning(f"no bundled modeling file for model type {model.config.model_type!r}: "
                       "the checkpoint reloads only through the architecture plugin's own loader")
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        finalize_checkpoint(tmp, model, adapter.kept_map() if adapter is not None else None)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info(f"saved pruned model to {path}")
    return path


def load_pruned(path: str | Path, **kwargs):
    """Load a pruned checkpoint (or an ordinary one) without remote code.

    ``kwargs`` go to ``from_pretrained`` (``dtype``, ``device_map``, ...).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    path = str(check_model_dir(path))
    config = AutoConfig.from_pretrained(path)
    cls = modeling_resp.RESP_CLASSES.get(config.model_type)
    if getattr(config, "is_heterogeneous", False) and cls is not None:
        return cls.from_pretrained(path, **kwargs)
    kwargs.setdefault("trust_remote_code", True)
    return AutoModelForCausalLM.from_pretrained(path, **kwargs)


def resolve_device(device: str, dtype: str) -> tuple[dict[str, Any], Any]:
    """``from_pretrained`` placement kwargs and torch dtype for ``--device`` / ``--dtype``.

    ``auto`` spreads the model over every visible GPU with accelerate (``device_map="auto"``),
    which is how 32B-70B models fit; without a GPU it means the CPU.
    """
    import torch

    dtypes = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in dtypes:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(dtypes)}")
    has_cuda = torch.cuda.is_available()
    if device.startswith("cuda") and not has_cuda:
        raise RuntimeError(f"--device {device} asked for a GPU but torch sees none; use --device cpu")
    on_cpu = device == "cpu" or (device == "auto" and not has_cuda)
    if on_cpu and dtype == "float16":
        raise ValueError("float16 is not supported for scoring on the CPU; use --dtype float32 or bfloat16")
    if device == "auto":
        placement: dict[str, Any] = {"device_map": "auto"} if has_cuda else {"device_map": "cpu"}
    else:
        placement = {"device_map": device}
    return placement, dtypes[dtype]


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def _damaged(path: Path, why: str) -> Exception:
    from resp_plugin.errors import UserError

    return UserError(f"{path} is damaged ({why}); copy or download the checkpoint again")


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
        raise FileNotFoundError(f"{p} holds config.json but no weights ({', '.join(WEIGHT_FILES[::2])}); "
                                "copy the weight files into it")
    for f in found:
        if f.name.endswith(".index.json"):
            try:
                shards = sorted(set(json.loads(f.read_text())["weight_map"].values()))
            except (ValueError, KeyError, AttributeError) as e:
                raise _damaged(f, f"not a weight index: {e}") from None
            missing = [s for s in shards if not (p / s).is_file()]
            if missing:
                raise FileNotFoundError(f"{f} names {len(missing)} missing shard(s), first {missing[0]}; "
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
        raise FileNotFoundError(f"model folder {p} does not exist; {hint}")
    if not p.is_dir():
        raise NotADirectoryError(f"{p} is a file, not a model folder; pass the folder that holds config.json")
    if not os.access(p, os.R_OK | os.X_OK):
        raise PermissionError(f"model folder {p} is not readable; fix its permissions (chmod +rx)")
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"{p} is not a model folder (no config.json); {hint}")
    try:
        json.loads((p / "config.json").read_text())
    except (ValueError, OSError) as e:
        raise _damaged(p / "config.json", f"not valid JSON: {e}") from None
    _check_weights(p)
    return p


def load_tokenizer(path: str | Path):
    """The tokenizer of a model folder; an empty one (no tokenizer files) is refused by name."""
    from transformers import AutoTokenizer

    from resp_plugin.errors import UserError, check_tokenizer, one_line

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError) as e:
        raise UserError(f"the tokenizer in {path} cannot be loaded ({one_line(e)}); copy the base model's "
                        "tokenizer files (tokenizer.json, tokenizer_config.json) into it") from e
    check_tokenizer(tokenizer, where=f"the tokenizer in {path}")
    return tokenizer


def load_model_and_tokenizer(path: str | Path, device: str = "auto", dtype: str = "auto"):
    """Load a checkpoint folder (pruned or dense) and its tokenizer for pruning or evaluation.

    Every file is checked first (:func:`check_model_dir`, :func:`load_tokenizer`): a wrong
    path or a damaged copy is one clear error, not a traceback from deep inside transformers.
    """
    p = check_model_dir(path)
    placement, torch_dtype = resolve_device(device, dtype)
    tokenizer = load_tokenizer(p)
    model = load_pruned(p, dtype=torch_dtype, **placement)
    model.eval()
    return model, tokenizer
