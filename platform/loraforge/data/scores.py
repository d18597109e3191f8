"""Model-based scores, computed once per row and stored as columns: perplexity, IFD, token cleaning.

`ScoreRows` is the per-batch part: a callable class, so Ray Data runs it in an actor pool that loads
the model(s) once. The selection steps that need the whole dataset are pure functions in three parts
(collect per batch -> resolve on the driver -> apply per batch):

    IFD selection     collect_ifd -> ifd_cutoff -> mark_ifd
    token cleaning    collect_token_scores -> token_threshold -> apply_token_weights

Definitions. Tokens are train's: `loraforge.train.sft_data.tokenize_conversation(tokenizer, messages,
scores.max_seq_len)` with the scoring model's tokenizer and chat template. CE(j) is the cross-entropy
of token j given tokens 0..j-1 (j >= 1; nothing predicts token 0).

- The *answer* is the last assistant turn's label tokens as train labels them (its content plus the
  template's end-of-turn marker) that survive truncation; for a preference row, the chosen answer.
- `ppl` = exp(mean CE over the answer tokens), everything before them as context.
- `ifd` (Li et al. 2023, "From Quantity to Quality") = s(A|Q) / s(A), both the mean CE over the very
  same answer token ids: s(A|Q) in the conversation (the instruction Q is every message before the
  last assistant turn), s(A) in the sequence `header + answer ids`, where `header` is what the
  template renders before the answer when the assistant message is the whole conversation (e.g.
  "<|bos|><|assistant|>\\n"), tokenised on its own; if the template refuses a lone assistant message
  or renders the answer differently, the header is the BOS token (else EOS). The answer is never
  re-tokenised, so both losses average identical tokens. Null for rows without an instruction (text
  rows: the assistant turn is the first message), with no answer token left after truncation, or
  with s(A) = 0.
- `token_scores` (Pang et al. 2025, "Token Cleaning") = CE_base(j) - CE_reference(j) for every
  predicted label position j of the conversation (all assistant turns, in order): exactly
  `sft_data.predicted_label_positions(labels)`, the positions train's `loss_weights` align with.
  High scores mark tokens the reference model (tuned on trusted data) predicts better than the base
  model: the informative ones. Dataset-wide, the top `keep_fraction` get weight 1, the rest 0.

Rehearsal rows (general-corpus replay) are scored but never dropped by IFD and never token-cleaned:
the reference model's view of "useful" is task-specific, and replay exists to keep general text.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
import torch.nn.functional as F

from loraforge.data.ops import mark_rows
from loraforge.data.schema import DROPPED, KEPT, OP_SCORES, ROW_SCHEMA
from loraforge.errors import ModelError
from loraforge.spec import LAB_DATA_PREFIX, ScoresSpec
from loraforge.train.sft_data import IGNORE_INDEX, predicted_label_positions, tokenize_segments

IFD_ABOVE_ONE, IFD_BELOW_CUTOFF = "ifd_above_one", "ifd_below_cutoff"
ADAPTER_CONFIG = "adapter_config.json"

Conversation = list[dict[str, str]]


# ---------------------------------------------------------------- per-row token plan
@dataclass(frozen=True)
class RowPlan:
    """The token sequences one row is scored on."""

    ids: list[int]  # train's tokens of the conversation, truncated to max_seq_len
    labels: list[int]  # train's labels (IGNORE_INDEX outside assistant turns)
    answer: tuple[int, int] | None  # [start, end) of the scored answer tokens in `ids` (start >= 1)
    direct: list[int] | None  # header + the same answer ids: the answer without its instruction (IFD)
    header_len: int  # where the answer starts in `direct`


def direct_header_ids(tokenizer: Any, answer_message: dict[str, str], answer_text: str) -> list[int]:
    """Tokens the template puts before an answer that has no instruction (see module docstring)."""
    try:
        solo = tokenizer.apply_chat_template([answer_message], tokenize=False)
    except Exception:  # noqa: BLE001 - templates raise anything (jinja errors) on a lone assistant turn
        solo = None
    at = solo.rfind(answer_text) if isinstance(solo, str) and answer_text else -1
    header = solo[:at] if at > 0 else (tokenizer.bos_token or tokenizer.eos_token or "")
    return tokenizer(header, add_special_tokens=False)["input_ids"] if header else []


def plan_row(tokenizer: Any, messages: Conversation, max_seq_len: int, with_direct: bool = True) -> RowPlan:
    """Train's tokenisation of the row, the span of its last assistant turn, and its direct sequence."""
    ids: list[int] = []
    labels: list[int] = []
    last: tuple[int, int, str] | None = None
    for text, piece, trainable in tokenize_segments(tokenizer, messages):
        if trainable:
            last = (len(ids), len(ids) + len(piece), text)
        ids.extend(piece)
        labels.extend(piece if trainable else [IGNORE_INDEX] * len(piece))
    ids, labels = ids[:max_seq_len], labels[:max_seq_len]
    if last is None:
        return RowPlan(ids, labels, None, None, 0)
    seg_start, seg_end, seg_text = last
    start, end = max(seg_start, 1), min(seg_end, len(ids))
    if start >= end:
        return RowPlan(ids, labels, None, None, 0)
    last_turn = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    if not with_direct or last_turn == 0 or seg_start == 0:
        return RowPlan(ids, labels, (start, end), None, 0)
    header = direct_header_ids(tokenizer, messages[last_turn], seg_text)
    if not header:
        return RowPlan(ids, labels, (start, end), None, 0)
    return RowPlan(ids, labels, (start, end), header + ids[start:end], len(header))


# ---------------------------------------------------------------- batched forward
def token_losses(
    model: Any, sequences: Sequence[list[int]], pad_id: int, batch_size: int
) -> list[np.ndarray]:
    """Per sequence, CE of each token given those before it (entry j-1 is token j's), float32.

    Sequences are sorted by length and right-padded in batches (attention mask 0 on padding, which a
    causal model never lets a real token see), so results do not depend on how rows are batched.
    """
    out: list[np.ndarray] = [np.zeros(0, np.float32) for _ in sequences]
    order = sorted((i for i, s in enumerate(sequences) if len(s) >= 2), key=lambda i: (len(sequences[i]), i))
    device = next(model.parameters()).device
    for b in range(0, len(order), batch_size):
        chunk = order[b : b + batch_size]
        width = len(sequences[chunk[-1]])
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, i in enumerate(chunk):
            ids[row, : len(sequences[i])] = torch.tensor(sequences[i])
            mask[row, : len(sequences[i])] = 1
        ids, mask = ids.to(device), mask.to(device)
        logits = model(input_ids=ids, attention_mask=mask).logits
        for row, i in enumerate(chunk):
            n = len(sequences[i])
            ce = F.cross_entropy(logits[row, : n - 1].float(), ids[row, 1:n], reduction="none")
            out[i] = ce.cpu().numpy().astype(np.float32)
    return out


# ---------------------------------------------------------------- models
def _local_path(ref: str) -> Path | None:
    if ref.startswith(LAB_DATA_PREFIX):
        from loraforge.resolve import resolve_data

        return resolve_data(ref)
    path = Path(ref).expanduser()
    return path if path.exists() else None


def load_reference(
    base: torch.nn.Module, tokenizer: Any, ref: str
) -> tuple[torch.nn.Module, torch.nn.Module, Callable[[], contextlib.AbstractContextManager]]:
    """(scoring model, reference model, context in which the scoring model is the base model).

    A PEFT adapter folder (has adapter_config.json) is loaded onto the base model itself: the
    reference is base + adapter, and the base is the same module with the adapter disabled, so one
    copy of the weights serves both. Anything else is loaded as a full model, which must share the
    scoring model's vocabulary (token scores subtract losses of the same token ids).
    """
    from loraforge.resolve import load_model, load_tokenizer

    path = _local_path(ref)
    if path is not None and (path / ADAPTER_CONFIG).is_file():
        from peft import PeftModel

        try:
            wrapped = PeftModel.from_pretrained(base, str(path)).eval()
        except (OSError, ValueError, RuntimeError, KeyError) as err:
            raise ModelError(f"cannot load reference adapter {ref!r} onto the scoring model: {err}") from None
        return wrapped, wrapped, wrapped.disable_adapter
    ref_path = str(path) if path is not None else ref
    reference = load_model(ref_path, dtype=torch.float32).eval()
    if load_tokenizer(ref_path).get_vocab() != tokenizer.get_vocab():
        raise ModelError(
            f"reference model {ref!r} has a different vocabulary from the scoring model: "
            "token scores compare losses of the same tokens, so both must share one tokenizer"
        )
    return base, reference, contextlib.nullcontext


def _set(table: pa.Table, name: str, values: list[Any]) -> pa.Table:
    return table.set_column(table.schema.get_field_index(name), name, pa.array(values, ROW_SCHEMA.field(name).type))


class ScoreRows:
    """Ray Data actor: fills `ppl`, `ifd` and (with token cleaning) `token_scores` of kept rows.

    `model_ref`: 'lab', a model folder or a hub id; `spec`: `ScoresSpec.model_dump()`.
    """

    def __init__(self, model_ref: str, spec: dict[str, Any]):
        from loraforge.resolve import load_model, load_tokenizer

        torch.set_num_threads(1)  # actors get fractional CPUs; more threads only contend
        self.spec = ScoresSpec.model_validate(spec)
        self.tokenizer = load_tokenizer(model_ref)
        model = load_model(model_ref, dtype=torch.float32).eval()
        self.reference: torch.nn.Module | None = None
        self.base_mode: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
        if self.spec.token_cleaning is not None:
            model, self.reference, self.base_mode = load_reference(
                model, self.tokenizer, self.spec.token_cleaning.reference_model
            )
        self.model = model.eval()
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    def __call__(self, table: pa.Table) -> pa.Table:
        spec = self.spec
        statuses = table.column("status").to_pylist()
        messages = table.column("messages").to_pylist()
        todo = [pos for pos, status in enumerate(statuses) if status == KEPT and messages[pos]]
        if not todo:
            return table
        plans = [plan_row(self.tokenizer, messages[pos], spec.max_seq_len, with_direct=spec.ifd) for pos in todo]
        direct_rows = [k for k, plan in enumerate(plans) if plan.direct is not None]
        sequences = [plan.ids for plan in plans] + [plans[k].direct for k in direct_rows]
        with torch.inference_mode(), self.base_mode():
            base = token_losses(self.model, sequences, self.pad_id, spec.batch_size)
        direct = dict(zip(direct_rows, base[len(plans) :], strict=True))
        reference = None
        if self.reference is not None:
            with torch.inference_mode():
                reference = token_losses(self.reference, [p.ids for p in plans], self.pad_id, spec.batch_size)

        ppl = table.column("ppl").to_pylist()
        ifd = table.column("ifd").to_pylist()
        token_scores = table.column("token_scores").to_pylist()
        for k, (pos, plan) in enumerate(zip(todo, plans, strict=True)):
            conditioned = None
            if plan.answer is not None:
                start, end = plan.answer
                conditioned = float(np.mean(base[k][start - 1 : end - 1], dtype=np.float64))
            if spec.perplexity:
                ppl[pos] = math.exp(conditioned) if conditioned is not None else None
            if spec.ifd:
                ifd[pos] = None
                if conditioned is not None and k in direct:
                    n = plan.answer[1] - plan.answer[0]
                    h = plan.header_len
                    unconditioned = float(np.mean(direct[k][h - 1 : h - 1 + n], dtype=np.float64))
                    ifd[pos] = conditioned / unconditioned if unconditioned > 0 else None
            if reference is not None:
                at = np.asarray(predicted_label_positions(plan.labels), dtype=np.int64) - 1
                token_scores[pos] = (base[k][at] - reference[k][at]).astype(np.float32).tolist()
        table = _set(table, "ppl", ppl)
        table = _set(table, "ifd", ifd)
        return _set(table, "token_scores", token_scores)


# ---------------------------------------------------------------- IFD selection
def _selectable(table: pa.Table) -> np.ndarray:
    """Rows selection may drop or clean: kept and not rehearsal."""
    kept = pc.fill_null(pc.equal(table.column("status"), KEPT), False)
    rehearsal = pc.fill_null(table.column("rehearsal"), False)
    return np.asarray(pc.and_(kept, pc.invert(rehearsal)).to_numpy(zero_copy_only=False), dtype=bool)


def collect_ifd(table: pa.Table, drop_above_one: bool = True) -> pa.Table:
    """Per batch: the IFD values the top-fraction cutoff ranks (kept, non-rehearsal, finite; <= 1 when
    rows above 1 are dropped anyway)."""
    values = np.asarray(table.column("ifd").to_numpy(zero_copy_only=False), dtype=np.float64)
    use = _selectable(table) & np.isfinite(values)
    if drop_above_one:
        use &= values <= 1.0
    return pa.table({"ifd": pa.array(values[use], pa.float64())})


def kept_count(total: int, fraction: float) -> int:
    """How many of `total` items the top `fraction` is: rounded half up, at least 1 (when total > 0)."""
    return min(total, max(1, math.floor(fraction * total + 0.5))) if total else 0


def ifd_cutoff(ifd_values: Sequence[float] | np.ndarray | pa.Array | pa.ChunkedArray,
               top_fraction: float | None) -> float | None:
    """Driver: the smallest IFD inside the top `top_fraction` of the values (None: keep all).

    Rows with IFD >= cutoff are kept; values tied with the cutoff are all kept.
    """
    if top_fraction is None:
        return None
    values = _flat(ifd_values)
    if values.size == 0:
        return None
    k = kept_count(values.size, top_fraction)
    return float(np.partition(values, values.size - k)[values.size - k])


def mark_ifd(table: pa.Table, drop_above_one: bool, cutoff: float | None) -> pa.Table:
    """Drop kept rows whose IFD is above 1 (the instruction does not help) or below the cutoff.

    Rehearsal rows and rows without an IFD are never dropped here.
    """
    values = table.column("ifd").to_pylist()
    selectable = _selectable(table)
    updates: dict[int, dict[str, Any]] = {}
    for pos, value in enumerate(values):
        if not selectable[pos] or value is None or not math.isfinite(value):
            continue
        if drop_above_one and value > 1.0:
            updates[pos] = {"status": DROPPED, "op": OP_SCORES, "reason": IFD_ABOVE_ONE,
                            "detail": f"IFD {value:.4f} > 1: the answer is no easier to predict with "
                                      "the instruction than without"}
        elif cutoff is not None and value < cutoff:
            updates[pos] = {"status": DROPPED, "op": OP_SCORES, "reason": IFD_BELOW_CUTOFF,
                            "detail": f"IFD {value:.4f} < {cutoff:.4f}, the cutoff of the top fraction by IFD"}
    return mark_rows(table, updates)


# ---------------------------------------------------------------- token cleaning
def _flat(values: Any) -> np.ndarray:
    """Finite float64 values from a list of lists, a flat sequence/array, or an Arrow (list) array."""
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks() if values.num_chunks else pa.array([], pa.float64())
    if isinstance(values, pa.Array):
        while pa.types.is_list(values.type) or pa.types.is_large_list(values.type):
            values = values.flatten()
        flat = np.asarray(values.to_numpy(zero_copy_only=False), dtype=np.float64)
    elif isinstance(values, np.ndarray):
        flat = values.astype(np.float64).ravel()
    else:
        items = list(values)
        if items and all(isinstance(v, (list, tuple, np.ndarray)) or v is None for v in items):
            parts = [np.asarray(v, dtype=np.float64).ravel() for v in items if v is not None]
            flat = np.concatenate(parts) if parts else np.zeros(0)
        else:
            flat = np.asarray([np.nan if v is None else v for v in items], dtype=np.float64)
    return flat[np.isfinite(flat)]


def collect_token_scores(table: pa.Table) -> pa.Table:
    """Per batch: the token scores of kept, non-rehearsal rows, flattened (one float32 column)."""
    scores = table.column("token_scores").filter(pa.array(_selectable(table)))
    flat = scores.combine_chunks().flatten() if scores.num_chunks else pa.array([], pa.float32())
    return pa.table({"token_score": flat.cast(pa.float32())})


def token_threshold(token_scores: Any, keep_fraction: float) -> float:
    """Driver: the score of the k-th best token, k = the top `keep_fraction` of all tokens ranked
    across the dataset (list of per-row lists, or a flat array). Tokens scoring >= it are kept, so
    exactly k are kept when scores are distinct and every token tied with the k-th is kept otherwise.
    With no tokens it is -inf (nothing to clean).
    """
    if not 0 < keep_fraction <= 1:
        raise ValueError(f"keep_fraction must be in (0, 1], got {keep_fraction}")
    values = _flat(token_scores)
    if values.size == 0:
        return -math.inf
    k = kept_count(values.size, keep_fraction)
    return float(np.partition(values, values.size - k)[values.size - k])


def apply_token_weights(table: pa.Table, threshold: float) -> pa.Table:
    """`loss_weights` of kept, non-rehearsal rows with token scores: 1.0 where score >= threshold,
    else 0.0 (same length as token_scores). Other rows keep null weights (train weighs them all 1)."""
    scores = table.column("token_scores").to_pylist()
    weights = table.column("loss_weights").to_pylist()
    selectable = _selectable(table)
    for pos, row_scores in enumerate(scores):
        if selectable[pos] and row_scores is not None:
            weights[pos] = [1.0 if s is not None and s >= threshold else 0.0 for s in row_scores]
    return _set(table, "loss_weights", weights)
