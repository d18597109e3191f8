"""Training objectives: each is a function of (model, batch) returning a scalar loss tensor."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from loraforge.train.sft_data import IGNORE_INDEX

Objective = Callable[[Any, dict[str, torch.Tensor]], torch.Tensor]

# Optional batch entry: the count this rank's summed loss is divided by. The loop sets it to
# (labelled tokens in the whole global batch) / world_size, so the gradient averaged over ranks is
# the token-weighted mean over the global batch whatever the world size or how tokens fall per rank.
LOSS_DENOMINATOR = "loss_denominator"


def predicted_label_count(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Labelled tokens that are predicted (the first position has no preceding token)."""
    return batch["labels"][:, 1:].ne(IGNORE_INDEX).sum()


def sft_loss(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Next-token cross-entropy over labelled (assistant) tokens, averaged per token.

    Computed here rather than by passing `labels=` to the model so a batch with no labelled token
    gives 0 instead of NaN, and logits are upcast to float32 whatever the model's dtype.
    """
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    logits = out.logits[:, :-1, :].float()
    labels = batch["labels"][:, 1:].to(logits.device)
    total = F.cross_entropy(
        logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    denominator = batch.get(LOSS_DENOMINATOR)
    if denominator is None:
        denominator = predicted_label_count(batch).clamp(min=1)
    return total / torch.as_tensor(denominator, dtype=total.dtype, device=total.device)


OBJECTIVES: dict[str, Objective] = {"sft": sft_loss}
