"""Where a model runs: the one reading of ``--device`` / ``--dtype`` (and the ``device`` / ``dtype``
settings), with the one refusal of a GPU that torch does not see.

Loading (:func:`resp_plugin.io.load_model_and_tokenizer`), torchrun ranks
(:func:`resp_plugin.distributed.rank_device`), the llm-compressor modifier and ``resp eval`` all
resolve their device here, so a setting means the same everywhere and fails the same way.
"""

from __future__ import annotations

from typing import Any

import torch

from resp_plugin.errors import ConfigError

DTYPES: dict[str, Any] = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16,
                          "float16": torch.float16}


def require_visible_gpu(device: str) -> None:
    """Refuse a ``cuda`` / ``cuda:N`` device when torch sees no GPU (before any model is loaded)."""
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {device} asked for a GPU but torch sees none; use --device cpu")


def torch_dtype(dtype: str) -> Any:
    """The torch dtype of a ``--dtype`` name (``"auto"``: the checkpoint's own)."""
    if dtype not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def resolve_device(device: str, dtype: str) -> tuple[dict[str, Any], Any]:
    """``from_pretrained`` placement kwargs and torch dtype for ``--device`` / ``--dtype``.

    ``auto`` spreads the model over every visible GPU with accelerate (``device_map="auto"``),
    which is how 32B-70B models fit; without a GPU it means the CPU.  float16 is refused on the
    CPU, where its backward pass (scoring) is not supported.
    """
    resolved = torch_dtype(dtype)
    require_visible_gpu(device)
    has_cuda = torch.cuda.is_available()
    on_cpu = device == "cpu" or (device == "auto" and not has_cuda)
    if on_cpu and dtype == "float16":
        raise ConfigError("float16 is not supported on the CPU; use --dtype float32 or bfloat16")
    if device == "auto":
        return {"device_map": "auto" if has_cuda else "cpu"}, resolved
    return {"device_map": device}, resolved


def compute_device(device: str, current: torch.device) -> torch.device:
    """Where a model now on ``current`` should compute: ``auto`` moves a CPU model to the accelerator
    when there is one and leaves it elsewhere where it is; any other value is that device."""
    require_visible_gpu(device)
    if device != "auto":
        return torch.device(device)
    accel = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
    return accel if accel is not None and current.type == "cpu" else current
