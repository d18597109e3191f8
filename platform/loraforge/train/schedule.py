"""Learning rate as a pure function of the step: nothing to checkpoint, exact after a resume."""

from __future__ import annotations

import math

MIN_LR_FRACTION = 0.1  # cosine decays to this fraction of the peak


def learning_rate_at(step: int, *, peak: float, warmup_steps: int, max_steps: int) -> float:
    """LR for the optimizer update of 0-based `step`: linear warmup, then cosine decay to 10%."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    decay_steps = max(1, max_steps - warmup_steps - 1)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return peak * (MIN_LR_FRACTION + (1 - MIN_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * progress)))
