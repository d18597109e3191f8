"""Training objectives: each is a function of (model, batch) returning a scalar loss tensor."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from loraforge.train.sft_data import IGNORE_INDEX, LOSS_WEIGHTS

Objective = Callable[[Any, dict[str, torch.Tensor]], torch.Tensor]

# Optional batch entry: the count this rank's summed loss is divided by. The loop sets it to
# (label weight in the whole global batch) / world_size, so the gradient averaged over ranks is the
# weighted per-token mean over the global batch whatever the world size or how tokens fall per rank.
# Without `loss_weights` in the batch every label weighs 1 and the weight is the label count.
LOSS_DENOMINATOR = "loss_denominator"


def predicted_label_count(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Labelled tokens that are predicted (the first position has no preceding token)."""
    return batch["labels"][:, 1:].ne(IGNORE_INDEX).sum()


def predicted_label_weight(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum of the loss weights of predicted labels (float); the label count when the batch has no weights."""
    labelled = batch["labels"][:, 1:].ne(IGNORE_INDEX)
    weights = batch.get(LOSS_WEIGHTS)
    if weights is None:
        return labelled.sum().float()
    return (weights[:, 1:].float() * labelled).sum()


def positive_or_one(value: torch.Tensor) -> torch.Tensor:
    """A denominator: the value where positive, else 1 (a batch with nothing to learn gives loss 0)."""
    return torch.where(value > 0, value, torch.ones_like(value))


def sft_loss(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Next-token cross-entropy over labelled (assistant) tokens, averaged per token.

    With `loss_weights` in the batch (token cleaning) each token's cross-entropy is multiplied by its
    weight and the sum divided by the weights' sum: a weighted mean; weight 0 removes a token entirely.
    Computed here rather than by passing `labels=` to the model so a batch with no labelled token
    gives 0 instead of NaN, and logits are upcast to float32 whatever the model's dtype.
    """
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    logits = out.logits[:, :-1, :].float()
    labels = batch["labels"][:, 1:].to(logits.device)
    weights = batch.get(LOSS_WEIGHTS)
    if weights is None:
        total = F.cross_entropy(
            logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
        )
    else:
        per_token = F.cross_entropy(
            logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
        )  # 0 on ignored positions
        total = (per_token * weights[:, 1:].to(logits.device, torch.float32).reshape(-1)).sum()
    denominator = batch.get(LOSS_DENOMINATOR)
    if denominator is None:
        if weights is None:
            denominator = predicted_label_count(batch).clamp(min=1)
        else:
            denominator = positive_or_one(predicted_label_weight(batch))
    return total / torch.as_tensor(denominator, dtype=total.dtype, device=total.device)


OBJECTIVES: dict[str, Objective] = {"sft": sft_loss}
