"""Plain result types shared by the engines and the HTTP layer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

BASE_ALIAS = "base"  # always accepted for the base model, whatever its served name

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: FinishReason


def cut_at_stop(text: str, stop: list[str]) -> tuple[str, bool]:
    """Text before the earliest stop string (OpenAI leaves the stop string out), and whether one was found."""
    hits = [i for i in (text.find(s) for s in stop) if i >= 0]
    return (text[: min(hits)], True) if hits else (text, False)


def eos_token_ids(model, tokenizer) -> list[int]:
    """Every id that ends a turn: the generation config's (may be a list) and the tokenizer's."""
    ids: set[int] = set()
    for source in (getattr(model.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(source, int):
            ids.add(source)
        elif source:
            ids.update(int(i) for i in source)
    return sorted(ids)


def context_length_of(config, tokenizer) -> int | None:
    n = getattr(config, "max_position_embeddings", None)
    if n is None and tokenizer.model_max_length < 1_000_000:  # HF's "unset" sentinel is ~1e30
        n = tokenizer.model_max_length
    return int(n) if n else None
