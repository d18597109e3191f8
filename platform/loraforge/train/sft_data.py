"""SFT data: conversations -> token ids with assistant-only labels -> deterministic sharded batches.

Everything here is plain Python/torch so it is unit-tested without Ray. The batch stream is a pure
function of (seed, step, world_rank, world_size, data_order): a worker restarted at step s with any
world size reads exactly the samples an uninterrupted run would have read at step s.

Per-token loss weights (curate's token cleaning) align with the *predicted label positions* of a
tokenised conversation: positions j >= 1 whose label is not IGNORE_INDEX, in order (position 0 has no
preceding token, so nothing predicts it). Curate's `token_scores` and `loss_weights` hold one value per
such position, computed with `tokenize_conversation` itself, so both stages agree by construction.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

from loraforge.errors import DataError

if TYPE_CHECKING:
    from loraforge.train.training_rows import TrainingRow

IGNORE_INDEX = -100  # label value that cross-entropy skips (prompt, system and padding tokens)

Message = dict[str, str]
Conversation = list[Message]
DataOrder = Literal["shuffle", "as_written"]
LOSS_WEIGHTS = "loss_weights"  # optional batch entry: per-position float weights, 0 where not labelled


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
    # Same length; the loss weight of each position (0 where unlabelled). None: every label weighs 1.
    weights: list[float] | None = None


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


def tokenize_segments(tokenizer: Any, messages: Conversation) -> list[tuple[str, list[int], bool]]:
    """(text, token ids, is_assistant) per segment, untruncated: the pieces `tokenize_conversation` joins.

    Pieces are tokenised one by one (the template supplies any BOS, so no special tokens are added):
    the prompt part is then tokenised exactly as a generation prompt is at inference time.
    """
    return [
        (text, tokenizer(text, add_special_tokens=False)["input_ids"], trainable)
        for text, trainable in conversation_segments(tokenizer, messages)
    ]


def predicted_label_positions(labels: Sequence[int]) -> list[int]:
    """Positions the loss is computed on: labelled (not IGNORE_INDEX) and not the first token."""
    return [j for j in range(1, len(labels)) if labels[j] != IGNORE_INDEX]


def spread_weights(
    labels: Sequence[int], loss_weights: Sequence[float], truncated: bool, max_seq_len: int
) -> list[float]:
    """Per-token weights (one per predicted label position) -> one weight per position, 0 elsewhere.

    Right-truncation only drops trailing weights; any other length difference means the weights were
    computed with another tokenizer or template, which would silently weigh the wrong tokens.
    """
    positions = predicted_label_positions(labels)
    if len(loss_weights) < len(positions) or (not truncated and len(loss_weights) != len(positions)):
        raise DataError(
            f"{len(loss_weights)} loss weights for {len(positions)} predicted label tokens "
            f"(max_seq_len={max_seq_len}): the weights were computed with a different tokenizer/chat template, "
            "or curate's scores.max_seq_len was shorter than train's max_seq_len"
        )
    out = [0.0] * len(labels)
    for j, w in zip(positions, loss_weights, strict=False):
        w = float(w)
        if not (w >= 0.0 and np.isfinite(w)):
            raise DataError(f"loss weight {w!r} is not a finite number >= 0")
        out[j] = w
    return out


def tokenize_conversation(
    tokenizer: Any, messages: Conversation, max_seq_len: int, loss_weights: Sequence[float] | None = None
) -> TokenizedExample:
    """Token ids of the templated conversation; labels only on assistant tokens; right-truncated.

    `loss_weights` (optional) has one entry per predicted label position of the untruncated
    conversation (see `predicted_label_positions`); truncation drops the trailing ones.
    """
    ids: list[int] = []
    labels: list[int] = []
    for _text, piece, trainable in tokenize_segments(tokenizer, messages):
        ids.extend(piece)
        labels.extend(piece if trainable else [IGNORE_INDEX] * len(piece))
    truncated = len(ids) > max_seq_len
    ids, labels = ids[:max_seq_len], labels[:max_seq_len]
    weights = None if loss_weights is None else spread_weights(labels, loss_weights, truncated, max_seq_len)
    return TokenizedExample(ids, labels, weights)


def tokenize_all(
    tokenizer: Any, conversations: Sequence[Conversation | TrainingRow], max_seq_len: int
) -> tuple[list[TokenizedExample], int]:
    """Tokenised examples that keep at least one assistant token, and how many were skipped.

    Items are conversations or `TrainingRow`s (a conversation plus optional per-token loss weights).
    """
    kept = []
    for n, item in enumerate(conversations):
        conv = getattr(item, "messages", item)  # a TrainingRow or a bare conversation
        weights = getattr(item, "loss_weights", None)
        name = f"row {getattr(item, 'id', None) or n}"
        try:
            ex = tokenize_conversation(tokenizer, conv, max_seq_len, weights)
        except DataError as err:
            raise DataError(f"{name}: {err}") from None
        if any(label != IGNORE_INDEX for label in ex.labels):
            kept.append(ex)
    if not kept:
        raise DataError(
            f"no conversation has an assistant turn within max_seq_len={max_seq_len} tokens "
            f"({len(conversations)} rows read)"
        )
    return kept, len(conversations) - len(kept)


def collate(examples: Sequence[TokenizedExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example; padding gets attention 0 and label IGNORE_INDEX.

    When any example carries weights the batch gets `loss_weights` (float, 0 on unlabelled and padded
    positions; an example without weights weighs each of its labels 1). Otherwise it has no such entry.
    """
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        mask[row, :n] = 1
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if any(e.weights is not None for e in examples):
        weights = torch.zeros((len(examples), width), dtype=torch.float32)
        for row, e in enumerate(examples):
            n = len(e.input_ids)
            weights[row, :n] = (
                labels[row, :n].ne(IGNORE_INDEX).float() if e.weights is None else torch.tensor(e.weights)
            )
        batch[LOSS_WEIGHTS] = weights
    return batch


# ---------------------------------------------------------------- sharded batches
def per_worker_batch_size(global_batch_size: int, world_size: int) -> int:
    """Re-derived on every (re)start, so an elastic restart with fewer workers keeps running."""
    return max(1, global_batch_size // max(1, world_size))


class EpochOrder:
    """Sample order of an endless stream of epochs, each a seeded permutation of the dataset.

    data_order "as_written": the first epoch follows the dataset's own order (curate's curriculum
    `position`); later epochs are shuffled as with "shuffle". Either way a pure function of the inputs.
    """

    def __init__(self, num_examples: int, seed: int, data_order: DataOrder = "shuffle"):
        if data_order not in ("shuffle", "as_written"):
            raise ValueError(f"unknown data_order {data_order!r}; expected 'shuffle' or 'as_written'")
        self.n = num_examples
        self.seed = seed
        self.data_order = data_order
        self._cache: dict[int, np.ndarray] = {}

    def __getitem__(self, position: int) -> int:
        epoch, offset = divmod(position, self.n)
        if epoch == 0 and self.data_order == "as_written":
            return offset
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
    data_order: DataOrder = "shuffle",
) -> Iterator[dict[str, torch.Tensor]]:
    """Endless per-worker batches from 0-based `start_step` on; resuming at s skips the first s."""
    order = EpochOrder(len(examples), seed, data_order)
    step = start_step
    while True:
        idx = batch_indices(order, step, global_batch_size, world_rank, world_size)
        yield collate([examples[i] for i in idx], pad_id)
        step += 1
