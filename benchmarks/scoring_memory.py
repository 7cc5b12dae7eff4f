"""Peak memory of one RESP scoring pass (``sum_abs``, ``vector``) against full weight gradients.

Every measurement runs in a fresh subprocess, so peaks never mix, on the same random-weight
Qwen3-shaped model and the same random calibration samples.  Modes:

- ``sum_abs``: ``resp_plugin.scoring.score`` with ``saliency="sum_abs"``: gradients of the
  prunable linears only (q, o, gate, up, down; k/v too for ``kv_group``), in fp32;
- ``vector``: ``score`` with ``saliency="vector"``: gradients of per-structure output
  multipliers only; no weight gradient exists;
- ``full_grads``: the same decode-only loss (``scoring.batch_loss``), but every parameter
  ``requires_grad`` and ``loss.backward()`` keeps ``.grad`` for all of them (embeddings and
  lm_head included), i.e. the reference implementation's way of getting weight gradients;
- ``reference``: as the reference computes it, ``model(input_ids, labels=...)`` (HF loss with
  prompt positions at -100, full logits materialised) and ``backward()``, all grads kept.

How memory is measured: CPU tensors come from glibc malloc.  The child sets
``MALLOC_MMAP_THRESHOLD_`` to 64 KiB so every tensor of >= 64 KiB is its own mmap, returned
to the OS when freed; the resident set (RSS) then follows live tensor bytes closely instead
of keeping freed heap pages.  After building the model and samples (and ``gc`` +
``malloc_trim``) the child reads VmRSS, resets the kernel's peak-RSS counter by writing ``5``
to ``/proc/self/clear_refs`` and, after the pass, reads VmHWM: the exact peak RSS of the pass
(no sampling, so no short peak is missed).  If ``clear_refs`` is not writable it falls back
to sampling VmRSS every millisecond in a thread.  Figures are reported as multiples of the
model's weight bytes: *overhead* = (peak - RSS with model and samples loaded) / weight bytes
and *total* = 1 + overhead (the weights plus all that the pass adds).

Run from the repo root: ``python benchmarks/scoring_memory.py`` (``--quick`` for a smoke run).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import subprocess
import sys
import threading
import time
from typing import Any

MODES = ("sum_abs", "vector", "full_grads", "reference")
TARGETS = {"sum_abs": 1.5, "vector": 1.2}  # issue targets: peak total, x model weight bytes


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


class PeakRSS:
    """Peak resident set size of a code block: kernel VmHWM after a reset, else 1 ms sampling."""

    def __enter__(self) -> PeakRSS:
        self.peak = 0
        self.method = "VmHWM after clear_refs"
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            self.method = "VmRSS sampled every 1 ms"
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _status_kb("VmRSS"))
            time.sleep(0.001)

    def __exit__(self, *exc: object) -> None:
        if self.method.startswith("VmHWM"):
            self.peak = _status_kb("VmHWM")
        else:
            self._stop.set()
            self._thread.join()


def _trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def child(mode: str, dtype_name: str, a: argparse.Namespace) -> dict[str, Any]:
    """One measurement, in this (fresh) process; returns byte counts."""
    import torch
    from official import official_batch_loss
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from resp_plugin import RESPConfig
    from resp_plugin.calibration import CalibrationSample
    from resp_plugin.scoring import batch_loss, score
    from resp_plugin.structures import adapter_for

    torch.set_num_threads(a.threads)
    dtype = getattr(torch, dtype_name)
    _trim()
    rss_runtime = _status_kb("VmRSS")

    torch.manual_seed(0)
    cfg = Qwen3Config(hidden_size=a.hidden, intermediate_size=a.intermediate, num_hidden_layers=a.layers,
                      num_attention_heads=16, num_key_value_heads=8, head_dim=64, vocab_size=a.vocab,
                      max_position_embeddings=4096, tie_word_embeddings=False, pad_token_id=0, eos_token_id=1)
    model = Qwen3ForCausalLM(cfg).to(dtype).eval()
    g = torch.Generator().manual_seed(1)
    samples = [CalibrationSample(input_ids=torch.randint(2, a.vocab, (a.length,), generator=g).tolist(),
                                 n_prompt=a.length // 4) for _ in range(a.samples)]
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    config = RESPConfig(sparsity=0.2, step=0.2, calibration="gold", saliency="vector" if mode == "vector"
                        else "sum_abs", batch_size=a.batch_size, protected_layers=[],
                        gradient_checkpointing=a.checkpointing, score_chunks=a.score_chunks)
    adapter = adapter_for(model)
    layers = list(range(adapter.num_layers))
    _trim()
    rss_model = _status_kb("VmRSS")

    t = time.perf_counter()
    with PeakRSS() as peak:
        if mode in ("sum_abs", "vector"):
            score(model, adapter, samples, config, layers, progress=False)
        else:
            for p in model.parameters():
                p.requires_grad_(True)
            if a.checkpointing:
                model.train()
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            for i in range(0, len(samples), a.batch_size):
                batch = samples[i:i + a.batch_size]
                if mode == "full_grads":
                    loss, _ = batch_loss(model, batch, len(samples), "decode")
                else:
                    loss = official_batch_loss(model, batch, len(samples), cfg.pad_token_id)
                loss.backward()
    seconds = time.perf_counter() - t
    grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
    return {"mode": mode, "dtype": dtype_name, "weight_bytes": weight_bytes, "rss_runtime": rss_runtime,
            "rss_model": rss_model, "peak": peak.peak, "method": peak.method, "seconds": seconds,
            "grads_left": grads}


def spawn(mode: str, dtype: str, a: argparse.Namespace) -> dict[str, Any]:
    """Run :func:`child` in a fresh interpreter with a fixed mmap threshold."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="65536",
               RESP_DISABLE_ENTRYPOINTS="1", TRANSFORMERS_VERBOSITY="error")
    args = [sys.executable, os.path.abspath(__file__), "--child", mode, dtype] + _shape_args(a)
    out = subprocess.run(args, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{mode}/{dtype} child failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


SHAPE = ("hidden", "intermediate", "layers", "vocab", "samples", "length", "batch_size", "threads")


def _shape_args(a: argparse.Namespace) -> list[str]:
    args = [f"--{k.replace('_', '-')}={getattr(a, k)}" for k in SHAPE]
    return args + [f"--score-chunks={a.score_chunks}"] + (["--checkpointing"] if a.checkpointing else [])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny model and samples (smoke test)")
    ap.add_argument("--dtypes", nargs="+", default=["float32"], choices=["float32", "bfloat16"],
                    help="bfloat16 is very slow on CPUs without native bf16")
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=3072)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--samples", type=int, default=8, help="calibration samples (one scoring pass over all)")
    ap.add_argument("--length", type=int, default=128, help="tokens per sample (first quarter is prompt)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--checkpointing", action="store_true", help="gradient checkpointing in every mode")
    ap.add_argument("--score-chunks", type=int, default=1, help="RESP modes: score layers in K passes")
    ap.add_argument("--child", nargs=2, metavar=("MODE", "DTYPE"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child[0], a.child[1], a)))
        return
    if a.quick:
        a.hidden, a.intermediate, a.layers, a.vocab, a.samples, a.length = 256, 768, 2, 1024, 2, 32

    print(f"model: Qwen3 hidden {a.hidden}, intermediate {a.intermediate}, {a.layers} layers (all scored), "
          f"16 q / 8 kv heads x 64, vocab {a.vocab}, untied embeddings, random weights")
    print(f"pass: {a.samples} samples x {a.length} tokens (prompt {a.length // 4}), batch {a.batch_size}, "
          f"gradient checkpointing {'on' if a.checkpointing else 'off'}, {a.threads} thread(s); "
          "each row a fresh subprocess")
    rows = []
    for dtype in a.dtypes:
        for mode in a.modes:
            r = spawn(mode, dtype, a)
            rows.append(r)
            print(f"  {dtype:<9}{mode:<11} done in {r['seconds']:.1f} s ({r['method']})", flush=True)

    mib = 2.0 ** 20
    cols = ["dtype", "mode", "weights MiB", "loaded x W", "overhead MiB", "overhead x W", "total x W",
            "target", "total ok", "overhead ok"]
    print("\n" + "".join(f"{c:>13}" for c in cols))
    for r in rows:
        w = r["weight_bytes"]
        over = (r["peak"] - r["rss_model"]) / w
        total = 1.0 + over
        target = TARGETS.get(r["mode"])
        cells = [r["dtype"], r["mode"], f"{w / mib:.0f}", f"{(r['rss_model'] - r['rss_runtime']) / w:.2f}",
                 f"{(r['peak'] - r['rss_model']) / mib:.0f}", f"{over:.2f}", f"{total:.2f}",
                 f"<= {target}" if target else "-"]
        cells += [("yes" if x <= target else "no") if target else "-" for x in (total, over)]
        print("".join(f"{c:>13}" for c in cells))
    print("\noverhead = (peak RSS during the pass - RSS with model and samples loaded) / weight bytes;")
    print("total = 1 + overhead (weights + everything the pass adds); loaded = (RSS with model and samples")
    print("- RSS of the bare runtime) / weight bytes, a check that RSS accounts for the weights (~1.0)")


if __name__ == "__main__":
    main()
