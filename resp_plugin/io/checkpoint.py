"""The pruned checkpoint format, and writing it.

A pruned checkpoint is an ordinary transformers checkpoint plus:

- the per-layer sizes in ``config.json``'s ``per_layer_config`` (read by
  :mod:`resp_plugin.structures.layout`, the format's one reader);
- ``RESP<Arch>`` in ``architectures``: the name under which runtimes pick a class that builds
  uneven layers (the RESP vLLM plugin, docs/serving.md), never a class assuming uniform ones;
- ``resp_spec`` in ``config.json``: the architecture's module names (its registered
  :class:`~resp_plugin.structures.DecoderSpec`);
- when transformers ships the dense class, ``modeling_resp.py`` (+ the ``layout.py`` and
  ``kv_attention.py`` it imports) named in ``auto_map``, so
  ``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`` rebuilds the smaller
  layers without resp-plugin installed;
- ``resp_pruning.json``: the kept heads and channels in the dense model's numbering;
- ``README.md``: the model card (:mod:`resp_plugin.model_card`).

:func:`resp_plugin.io.load_pruned` reloads all of this without running any file of the folder.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from loguru import logger

from resp_plugin.errors import OutputExists
from resp_plugin.io.files import atomic_folder, atomic_write_json
from resp_plugin.structures import kv_attention, layout, modeling_resp
from resp_plugin.structures.layout import dense_architecture_name, pruned_architecture_name

MODELING_FILE = "modeling_resp.py"
# The files copied into a checkpoint: the loader, and what it imports (``.layout``, ``.kv_attention``).
BUNDLED_MODULES = (modeling_resp, layout, kv_attention)
KEPT_FILE = "resp_pruning.json"


def auto_map_for(model) -> dict[str, str] | None:
    """``auto_map`` naming the bundled loader's ``RESP<Dense>``, when transformers ships ``Dense``
    (the bundled loader builds its class from it); None for a class defined elsewhere."""
    import transformers

    dense_name = dense_architecture_name(type(model).__name__)
    dense = getattr(transformers, dense_name, None)
    if not (isinstance(dense, type) and dense in type(model).__mro__):
        return None
    return {"AutoModelForCausalLM": f"{Path(MODELING_FILE).stem}.{pruned_architecture_name(dense_name)}"}


def pruned_config_fields(model) -> dict[str, Any]:
    """The fields a pruned checkpoint's config.json must carry (written back after foreign saves)."""
    cfg = model.config.to_dict()
    if "per_layer_config" not in cfg:
        return {}
    fields: dict[str, Any] = {"per_layer_config": cfg["per_layer_config"],
                              "architectures": [pruned_architecture_name(type(model).__name__)]}
    if "resp_spec" in cfg:
        fields["resp_spec"] = cfg["resp_spec"]
    amap = auto_map_for(model)
    if amap:
        fields["auto_map"] = amap
    return fields


def finalize_checkpoint(path: str | Path, model, kept: list[dict] | None = None) -> None:
    """Make a saved directory reload as a pruned model: restore config fields, copy modeling files.

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
    if "auto_map" in fields:
        for module in BUNDLED_MODULES:
            shutil.copyfile(module.__file__, path / Path(module.__file__).name)
    if kept is not None:
        atomic_write_json(path / KEPT_FILE, {"layers": kept})


def save_pruned(model, tokenizer, path: str | Path, adapter=None, overwrite: bool = False) -> Path:
    """Save atomically (a temp folder renamed into place), then write the model card."""
    from resp_plugin.model_card import write_model_card

    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputExists(f"{path} already exists; pass --overwrite (or --resume) to replace it")
    if adapter is not None:
        adapter.record_sizes_in_config()
    if auto_map_for(model) is None:
        logger.info(f"{type(model).__name__} is not a transformers class: the checkpoint reloads with "
                    "resp_plugin.load_pruned (its architecture plugin installed), not with trust_remote_code alone")
    with atomic_folder(path) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        finalize_checkpoint(tmp, model, adapter.kept_map() if adapter is not None else None)
    write_model_card(path, base_model=getattr(model, "name_or_path", None) or None)
    logger.info(f"saved pruned model to {path}")
    return path
