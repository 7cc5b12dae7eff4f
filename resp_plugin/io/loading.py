"""Loading checkpoints (pruned or dense) without running code from the model folder.

A model folder can name Python files of its own in ``config.json``'s ``auto_map``; transformers
runs them under ``trust_remote_code=True``.  resp-plugin never asks for that on its own: a pruned
checkpoint is built by the installed RESP classes (:func:`resp_plugin.structures.pruned_model_class`),
whatever modeling file it carries, and a folder's own code runs only when the user passes
``trust_remote_code=True`` (``--trust-remote-code``), as with transformers and lm-eval.
"""

from __future__ import annotations

import json
from pathlib import Path

from loguru import logger

from resp_plugin.io.model_folder import check_model_dir


def remote_code_of(path: str | Path) -> dict[str, str]:
    """The ``auto_map`` entries of a folder's config.json and tokenizer_config.json that are not RESP's own."""
    from resp_plugin.io.checkpoint import MODELING_FILE

    found: dict[str, str] = {}
    for name in ("config.json", "tokenizer_config.json"):
        f = Path(path) / name
        try:
            amap = json.loads(f.read_text()).get("auto_map") if f.is_file() else None
        except (ValueError, OSError, AttributeError):
            continue
        for key, ref in (amap or {}).items():
            refs = ref if isinstance(ref, list) else [ref]
            own = all(r is None or str(r).startswith(Path(MODELING_FILE).stem + ".") for r in refs)
            if not own:
                found[key] = str(ref)
    return found


def check_remote_code(path: str | Path, trust_remote_code: bool) -> None:
    """Refuse a folder that cannot load without its own code unless trusted; say when code is skipped."""
    from transformers import CONFIG_MAPPING

    from resp_plugin.errors import UserError

    foreign = remote_code_of(path)
    if not foreign or trust_remote_code:
        return
    model_type = json.loads((Path(path) / "config.json").read_text()).get("model_type")
    if model_type not in CONFIG_MAPPING:
        raise UserError(f"{path} needs its own Python code to load ({', '.join(sorted(foreign.values()))} in "
                        f"auto_map; model type {model_type!r} is not in transformers); resp runs a model's code "
                        "only when asked: read that code, then pass --trust-remote-code (trust_remote_code=True)")
    logger.info(f"{path} names its own code in auto_map ({', '.join(sorted(foreign))}); not run: loading "
                f"transformers' {model_type!r} classes (pass --trust-remote-code to run it instead)")


def load_pruned(path: str | Path, *, trust_remote_code: bool = False, **kwargs):
    """Load a pruned checkpoint (or an ordinary one); the folder's own code runs only if trusted.

    A pruned checkpoint always loads through the installed RESP classes (the bundled
    ``modeling_resp.py`` of any version is never executed); ``kwargs`` go to
    ``from_pretrained`` (``dtype``, ``device_map``, ...).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    from resp_plugin.structures import pruned_model_class
    from resp_plugin.structures.layout import is_pruned_config

    path = str(check_model_dir(path))
    check_remote_code(path, trust_remote_code)
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    if is_pruned_config(config):
        _refuse_quantised_moe(path, config)
        return pruned_model_class(config).from_pretrained(path, config=config, **kwargs)
    return AutoModelForCausalLM.from_pretrained(path, config=config, trust_remote_code=trust_remote_code, **kwargs)


def _refuse_quantised_moe(path: str, config) -> None:
    """A quantised pruned MoE checkpoint (llm-compressor: per-expert Linear weights with scales) would load
    with its experts randomly initialised, transformers 5.17 reporting them only as missing: with a
    ``quantization_config`` it does not fuse per-expert weights into its 3-D experts (the same holds for an
    unpruned MoE model quantised by llm-compressor).  Refused by name instead (docs/moe.md)."""
    from resp_plugin.errors import UnsupportedModel

    quantised = getattr(config, "quantization_config", None) is not None
    if quantised and any(getattr(lc, "resp_num_experts", None) is not None for lc in config.per_layer_config):
        raise UnsupportedModel(
            f"{path} is a quantised Mixture-of-Experts checkpoint: transformers does not load quantised "
            "per-expert weights into its fused experts (they would be left random), so resp-plugin cannot load it; "
            "load the unquantised pruned checkpoint, or serve it with a runtime that reads per-expert weights "
            "(docs/moe.md)")


def load_tokenizer(path: str | Path, trust_remote_code: bool = False):
    """The tokenizer of a model folder; an empty one (no tokenizer files) is refused by name."""
    from transformers import AutoTokenizer

    from resp_plugin.checks import check_tokenizer
    from resp_plugin.errors import UserError, one_line

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError) as e:
        if "trust_remote_code" in str(e) and not trust_remote_code:
            raise UserError(f"the tokenizer in {path} needs its own Python code (auto_map in tokenizer_config.json); "
                            "read that code, then pass --trust-remote-code (trust_remote_code=True)") from e
        raise UserError(f"the tokenizer in {path} cannot be loaded ({one_line(e)}); copy the base model's "
                        "tokenizer files (tokenizer.json, tokenizer_config.json) into it") from e
    check_tokenizer(tokenizer, where=f"the tokenizer in {path}")
    return tokenizer


def load_model_and_tokenizer(path: str | Path, device: str = "auto", dtype: str = "auto", *,
                             trust_remote_code: bool = False):
    """Load a checkpoint folder (pruned or dense) and its tokenizer for pruning or evaluation.

    Every file is checked first (:func:`check_model_dir`, :func:`load_tokenizer`): a wrong
    path or a damaged copy is one clear error, not a traceback from deep inside transformers.
    The folder's own code (``auto_map``) runs only with ``trust_remote_code=True``.
    """
    p = check_model_dir(path)
    from resp_plugin.devices import resolve_device

    placement, torch_dtype = resolve_device(device, dtype)
    tokenizer = load_tokenizer(p, trust_remote_code)
    model = load_pruned(p, trust_remote_code=trust_remote_code, dtype=torch_dtype, **placement)
    model.eval()
    return model, tokenizer
