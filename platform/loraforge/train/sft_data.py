"""SFT data: conversations -> token ids with assistant-only labels -> deterministic sharded batches.

Everything here is plain Python/torch so it is unit-tested without Ray. The batch stream is a pure
function of (seed, step, world_rank, world_size): a worker restarted at step s with any world size
reads exactly the samples an uninterrupted run would have read at step s.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from loraforge.errors import DataError

IGNORE_INDEX = -100  # label value that cross-entropy skips (prompt, system and padding tokens)

Message = dict[str, str]
Conversation = list[Message]


# ---------------------------------------------------------------- reading
def read_training_conversations(path: str | Path) -> list[Conversation]:
    """Conversations from a curate output folder, a Parquet file or a JSONL file (alpaca/chat rows).

    The curation package's reader is used so train reads exactly what curate wrote.
    """
    from loraforge.data.io import read_conversations

    return read_conversations(path)


# ---------------------------------------------------------------- tokenising
@dataclass(frozen=True)
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]  # same length; IGNORE_INDEX outside assistant turns


def _render(tokenizer: Any, messages: Conversation, gen_prompt: bool) -> str:
    if not messages:
        return ""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen_prompt)


def conversation_segments(tokenizer: Any, messages: Conversation) -> list[tuple[str, bool]]:
    """Split the rendered conversation into (text, is_assistant) pieces that concatenate to it.

    An assistant piece runs from the end of the generation prompt to the end of the turn as the
    template renders it (its end-of-turn marker included, so the model learns to stop).
    """
    full = _render(tokenizer, messages, gen_prompt=False)
    segments: list[tuple[str, bool]] = []
    pos = 0
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        start = len(_render(tokenizer, messages[:i], gen_prompt=True))
        through = _render(tokenizer, messages[: i + 1], gen_prompt=False)
        if not (full.startswith(through) and start >= pos and start <= len(through)):
            raise DataError(
                "the model's chat template does not render a conversation as a prefix of a longer one; "
                "assistant tokens cannot be located for label masking"
            )
        segments.append((full[pos:start], False))
        segments.append((full[start : len(through)], True))
        pos = len(through)
    segments.append((full[pos:], False))
    return [(text, trainable) for text, trainable in segments if text]


def tokenize_conversation(tokenizer: Any, messages: Conversation, max_seq_len: int) -> TokenizedExample:
    """Token ids of the templated conversation; labels only on assistant tokens; right-truncated.

    Pieces are tokenised one by one (the template supplies any BOS, so no special tokens are added):
    the prompt part is then tokenised exactly as a generation prompt is at inference time.
    """
    ids: list[int] = []
    labels: list[int] = []
    for text, trainable in conversation_segments(tokenizer, messages):
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids.extend(piece)
        labels.extend(piece if trainable else [IGNORE_INDEX] * len(piece))
    return TokenizedExample(ids[:max_seq_len], labels[:max_seq_len])


def tokenize_all(
    tokenizer: Any, conversations: Sequence[Conversation], max_seq_len: int
) -> tuple[list[TokenizedExample], int]:
    """Tokenised examples that keep at least one assistant token, and how many were skipped."""
    kept = []
    for conv in conversations:
        ex = tokenize_conversation(tokenizer, conv, max_seq_len)
        if any(label != IGNORE_INDEX for label in ex.labels):
            kept.append(ex)
    if not kept:
        raise DataError(
            f"no conversation has an assistant turn within max_seq_len={max_seq_len} tokens "
            f"({len(conversations)} rows read)"
        )
    return kept, len(conversations) - len(kept)


def collate(examples: Sequence[TokenizedExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example; padding gets attention 0 and label IGNORE_INDEX."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


# ---------------------------------------------------------------- sharded batches
def per_worker_batch_size(global_batch_size: int, world_size: int) -> int:
    """Re-derived on every (re)start, so an elastic restart with fewer workers keeps running."""
    return max(1, global_batch_size // max(1, world_size))


class EpochOrder:
    """Sample order of an endless stream of epochs, each a seeded permutation of the dataset."""

    def __init__(self, num_examples: int, seed: int):
        self.n = num_examples
        self.seed = seed
        self._cache: dict[int, np.ndarray] = {}

    def __getitem__(self, position: int) -> int:
        epoch, offset = divmod(position, self.n)
        if epoch not in self._cache:
            self._cache = {epoch: np.random.default_rng([self.seed, epoch]).permutation(self.n)}
        return int(self._cache[epoch][offset])


def batch_indices(
    order: EpochOrder, step: int, global_batch_size: int, world_rank: int, world_size: int
) -> list[int]:
    """Dataset indices worker `world_rank` trains on at 0-based `step`: its slice of the global batch."""
    per = per_worker_batch_size(global_batch_size, world_size)
    start = step * per * world_size + world_rank * per
    return [order[p] for p in range(start, start + per)]


def iter_batches(
    examples: Sequence[TokenizedExample],
    *,
    global_batch_size: int,
    world_rank: int,
    world_size: int,
    seed: int,
    pad_id: int,
    start_step: int = 0,
) -> Iterator[dict[str, torch.Tensor]]:
    """Endless per-worker batches from 0-based `start_step` on; resuming at s skips the first s."""
    order = EpochOrder(len(examples), seed)
    step = start_step
    while True:
        idx = batch_indices(order, step, global_batch_size, world_rank, world_size)
        yield collate([examples[i] for i in idx], pad_id)
        step += 1
