"""Generation backends that write self-generated calibration traces.

``hf`` (default): transformers ``generate`` batched with left padding, prompts sorted by
length so a batch wastes little padding, KV cache on, stopping at EOS.  ``vllm`` is used
only when installed and asked for (``generation.backend: vllm``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from resp_plugin.calibration import render_prompt


@dataclass
class Completion:
    text: str
    finished: bool
    n_tokens: int


def _eos_ids(model, tokenizer) -> set[int]:
    ids = set()
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for e in (gen_eos if isinstance(gen_eos, list) else [gen_eos]):
        if e is not None:
            ids.add(int(e))
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids


class HFGenerationBackend:
    """Batched sampling with transformers ``generate``."""

    def __init__(self, gen_config, seed: int = 0) -> None:
        self.cfg = gen_config
        self.seed = seed

    @torch.no_grad()
    def generate(self, model, tokenizer, prompts: list[str], seed: int | None = None) -> list[Completion]:
        cfg = self.cfg
        texts = []
        for p in prompts:
            text, templated = render_prompt(tokenizer, p, cfg.thinking)
            texts.append((text, templated))
        encoded = [tokenizer(t, add_special_tokens=not tmpl)["input_ids"] for t, tmpl in texts]
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
        eos = _eos_ids(model, tokenizer)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos) if eos else 0
        device = model.get_input_embeddings().weight.device
        results: list[Completion | None] = [None] * len(prompts)
        was_training = model.training
        model.eval()
        sampling = cfg.temperature > 0
        kwargs = dict(max_new_tokens=cfg.max_new_tokens, do_sample=sampling, pad_token_id=pad,
                      eos_token_id=sorted(eos) or None, use_cache=True)
        if sampling:
            kwargs.update(temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k)
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        torch.manual_seed(self.seed if seed is None else seed)
        batches = [order[i:i + cfg.batch_size] for i in range(0, len(order), cfg.batch_size)]
        for batch in tqdm(batches, desc="generating traces", unit="batch", leave=False):
            width = max(len(encoded[i]) for i in batch)
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for r, i in enumerate(batch):
                seq = encoded[i]
                ids[r, width - len(seq):] = torch.tensor(seq)
                mask[r, width - len(seq):] = 1
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs)
            for r, i in enumerate(batch):
                gen = out[r, width:].tolist()
                finished = False
                for k, tok in enumerate(gen):
                    if tok in eos:
                        gen, finished = gen[:k], True
                        break
                text = tokenizer.decode(gen, skip_special_tokens=False)
                results[i] = Completion(text=text, finished=finished, n_tokens=len(gen))
        model.train(was_training)
        return results  # type: ignore[return-value]


class VLLMGenerationBackend:
    """vLLM sampling from the current weights (exported to a temporary checkpoint).

    Only for models vLLM can load: a model whose layers were physically pruned to
    non-uniform sizes cannot be expressed in vLLM's model classes, so use ``hf`` after the
    first removal unless your vLLM build has a heterogeneous-layer model.
    """

    def __init__(self, gen_config, seed: int = 0) -> None:
        try:
            import vllm  # noqa: F401
        except ImportError as e:
            raise RuntimeError("generation backend 'vllm' needs `pip install vllm`; or use --backend hf") from e
        self.cfg = gen_config
        self.seed = seed

    def generate(self, model, tokenizer, prompts: list[str], seed: int | None = None) -> list[Completion]:
        import tempfile

        from vllm import LLM, SamplingParams

        cfg = self.cfg
        with tempfile.TemporaryDirectory(prefix="resp-vllm-") as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            llm = LLM(model=tmp, tensor_parallel_size=cfg.tensor_parallel_size, seed=self.seed if seed is None
                      else seed, trust_remote_code=True)
            params = SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k or -1,
                                    max_tokens=cfg.max_new_tokens)
            texts = [render_prompt(tokenizer, p, cfg.thinking)[0] for p in prompts]
            outs = llm.generate(texts, params)
        return [Completion(text=o.outputs[0].text, finished=o.outputs[0].finish_reason == "stop",
                           n_tokens=len(o.outputs[0].token_ids)) for o in outs]
