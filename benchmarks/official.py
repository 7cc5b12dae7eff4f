"""How the official RESP code computes the loss it takes gradients of, for side-by-side benchmarks.

It calls the model with ``labels`` (prompt positions at -100), so transformers computes logits over
the whole vocabulary at every position and the mean loss over the generated tokens; every parameter
requires a gradient.  RESP's own pass (``resp_plugin.scoring``) computes the lm_head only at target
positions and keeps gradients of the scored linears only; these benchmarks measure the difference.
"""

from __future__ import annotations

import torch

from resp_plugin.calibration import pad_batch


def official_batch_loss(model, batch, n_total: int, pad_id: int) -> torch.Tensor:
    """The official code's loss on ``batch`` (calibration samples), weighted as a share of ``n_total``."""
    ids, attention = pad_batch([s.input_ids for s in batch], pad_id)
    labels = ids.masked_fill(attention == 0, -100)
    for b, sample in enumerate(batch):
        labels[b, :sample.n_prompt] = -100
    loss = model(input_ids=ids, attention_mask=attention, labels=labels, use_cache=False).loss
    return loss * len(batch) / n_total
