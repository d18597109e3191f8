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


