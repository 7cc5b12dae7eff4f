"""One device resolver: every entry point refuses a GPU torch does not see with the same one line."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from resp_plugin import devices, distributed
from resp_plugin.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
NO_GPU = r"--device cuda(:\d)? asked for a GPU but torch sees none; use --device cpu"

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")


def test_loading_torchrun_and_llmcompressor_placement_refuse_alike(monkeypatch):
    with pytest.raises(ConfigError, match=NO_GPU):
        devices.resolve_device("cuda:0", "auto")  # loading (resp prune, resp eval, reproduce)
    with pytest.raises(ConfigError, match=NO_GPU):
        devices.compute_device("cuda", torch.device("cpu"))  # the llm-compressor modifier's placement
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match=NO_GPU):
        distributed.rank_device("cuda")  # a torchrun rank
    assert distributed.rank_device("auto") == "cpu"
    assert devices.compute_device("auto", torch.device("cpu")).type == "cpu"


def test_the_no_gpu_message_is_written_once():
    """The message lives in resp_plugin/devices.py alone, so it cannot drift between entry points."""
    files = [*(ROOT / "resp_plugin").rglob("*.py"), *(ROOT / "integrations").rglob("*.py")]
    holders = [p.relative_to(ROOT).as_posix() for p in files if "torch sees none" in p.read_text()]
    assert holders == ["resp_plugin/devices.py"]
