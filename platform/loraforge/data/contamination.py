"""Contamination check: drop training rows that overlap an evaluation set.

Two tests, both on normalised words (lowercase, no punctuation, every digit run -> "0", so a
changed number is no disguise):

- exact: the row shares one word n-gram (ContaminationSpec.ngram, default 13) with an eval item;
  the index is a sorted array of the eval items' n-gram hashes, probed with one searchsorted.
  N-grams made mostly of numbers are left out on both sides (they match any table of figures);
- fuzzy: one of the row's messages has word 3-gram Jaccard >= fuzzy_threshold with one text of an
  eval item (a GSM8K question or answer, a message of a conversation). Candidates come from a
  MinHash-LSH index over the eval texts, weighted for recall, and every candidate is verified with
  the exact Jaccard of the two 3-gram sets, so the LSH only decides what is worth checking.

`build_contamination_index` runs once on the driver; the index is plain numpy and pickles small.
`mark_contaminated` is the per-batch op.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from loraforge.data.formats import RowError, parse_record
from loraforge.data.minhash import (
    Ragged,
    band_hashes,
    distinct_sorted,
    joined_contents,
    lsh_params,
    minhash_signatures,
    normalised_words,
    shingle_hashes,
    word_hashes,
)
from loraforge.data.ops import mark_rows
from loraforge.data.schema import DROPPED, KEPT, OP_CONTAMINATION
from loraforge.errors import DataError
from loraforge.resolve import resolve_data
from loraforge.spec import ContaminationSpec

NGRAM_OVERLAP, FUZZY_MATCH = "ngram_overlap", "fuzzy_match"
FUZZY_NGRAM = 3
# Texts with fewer words are left out of the fuzzy test: two 3-word texts match on one shared
# trigram, which says nothing. They still take part in the exact n-gram test.
FUZZY_MIN_WORDS = 8
FUZZY_NUM_PERM = 128
# Candidates are verified exactly, so misses weigh 9x false candidates; at 0.5 this gives 32 bands
# x 4 rows. Not heavier: math word problems share many 3-grams (J ~0.2) and each candidate costs
# one exact check.
FUZZY_FP_WEIGHT, FUZZY_FN_WEIGHT = 0.1, 0.9
SNIPPET_CHARS = 80
PROMPT_ROLES = frozenset({"system", "user"})


@dataclass(frozen=True)
class EvalItem:
    id: str  # "<file stem>:<line>"
    texts: tuple[str, ...]  # what is compared: question and answer, or every message


def _item_texts(obj: object, where: str) -> tuple[str, ...]:
    if isinstance(obj, dict) and "question" in obj:  # GSM8K and similar {"question", "answer"} rows
        texts = [obj["question"], obj.get("answer") or ""]
        if not all(isinstance(t, str) for t in texts):
            raise DataError(f"{where}: 'question' and 'answer' must be strings")
        return tuple(t for t in texts if t.strip())
    try:
        rows = parse_record(obj, "auto")
    except RowError as err:
        raise DataError(f"{where}: not a GSM8K row or a curate input row: {err}") from None
    texts = []
    for _sub, parsed in rows:
        if isinstance(parsed, RowError):
            raise DataError(f"{where}: {parsed}")
        texts.extend(m["content"] for m in parsed.messages)
        texts.append(parsed.rejected or "")
    return tuple(t for t in texts if t.strip())


def load_eval_items(paths: list[str] | list[Path]) -> list[EvalItem]:
    """Eval items from JSONL files: GSM8K {"question", "answer"} rows or any curate input format.

    Item ids are "<file stem>:<line number>". Raises DataError naming the file (and line) when a
    file is missing or a line is unusable: an eval set is configuration, not data to be cleaned.
    """
    items: list[EvalItem] = []
    for ref in paths:
        path = resolve_data(str(ref))
        if not path.is_file():
            raise DataError(f"eval set {ref} is not a file (expected JSONL)")
        try:
            raw_lines = path.read_bytes().splitlines()
        except OSError as err:
            raise DataError(f"cannot read eval set {path}: {err.strerror or err}") from None
        for number, raw in enumerate(raw_lines, start=1):
            if not raw.strip():
                continue
            where = f"{path}:{number}"
            try:
                obj = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as err:
                raise DataError(f"{where}: not a JSON line: {err}") from None
            texts = _item_texts(obj, where)
            if texts:
                items.append(EvalItem(f"{path.stem}:{number}", texts))
    if not items:
        raise DataError(f"no eval items in {', '.join(map(str, paths)) or '(no files)'}")
    return items


def _snippet(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= SNIPPET_CHARS else text[: SNIPPET_CHARS - 3] + "..."


def _content_grams(words: pa.ListArray, n: int) -> tuple[Ragged, np.ndarray]:
    """Word n-gram hashes per row, leaving out n-grams that are mostly numbers (more than n // 2
    masked digit runs: "0 0 0 ..." from a table of figures would otherwise match any other table),
    and the word index in its row where each kept n-gram starts."""
    grams = shingle_hashes(word_hashes(words), n, short="none")
    if len(grams.values) == 0:
        return grams, np.zeros(0, np.int64)
    word_offsets = np.asarray(words.offsets.to_numpy(zero_copy_only=False), dtype=np.int64)
    word_offsets = word_offsets - word_offsets[0]
    numeric = pc.equal(words.flatten(), "0").to_numpy(zero_copy_only=False)
    cum = np.concatenate([[0], np.cumsum(numeric)])
    rows = np.repeat(np.arange(len(grams)), grams.lengths)
    start_in_row = np.arange(len(grams.values)) - grams.offsets[rows]
    start = word_offsets[rows] + start_in_row
    keep = (cum[start + n] - cum[start]) <= n // 2
    counts = np.bincount(rows[keep], minlength=len(grams))
    kept = Ragged(grams.values[keep], np.concatenate([[0], np.cumsum(counts)]).astype(np.int64))
    return kept, start_in_row[keep]


def _fuzzy_units(texts: pa.Array) -> tuple[Ragged, np.ndarray]:
    """(3-gram sets, mask of texts long enough for the fuzzy test)."""
    words = word_hashes(normalised_words(texts, mask_digits=True))
    long_enough = words.lengths >= FUZZY_MIN_WORDS
    return distinct_sorted(shingle_hashes(words, FUZZY_NGRAM, short="none")), long_enough


@dataclass
class ContaminationIndex:
    """What mark_contaminated needs about the eval sets; numpy arrays, so it pickles compactly."""

    ngram: int
    fuzzy_threshold: float
    item_ids: list[str]
    item_snippets: list[str]
    gram_hashes: np.ndarray  # sorted uint64 n-gram hashes of all eval texts
    gram_items: np.ndarray  # item index of each entry of gram_hashes
    unit_items: np.ndarray  # item index of each fuzzy text
    unit_snippets: list[str]
    unit_sets: Ragged  # sorted 3-gram hash set of each fuzzy text
    bands: int
    rows: int
    band_sorted: np.ndarray  # (bands, units) band hashes, each band sorted
    band_units: np.ndarray  # (bands, units) unit index of each sorted entry

    def __len__(self) -> int:
        return len(self.item_ids)


def build_contamination_index(items: list[EvalItem], spec: ContaminationSpec) -> ContaminationIndex:
    """Hash every eval text's n-grams (exact test) and 3-gram sets + LSH bands (fuzzy test)."""
    if not items:
        raise ValueError("no eval items to build a contamination index from")
    text_items = np.array([i for i, item in enumerate(items) for _ in item.texts], dtype=np.int32)
    texts = [t for item in items for t in item.texts]
    arr = pa.array(texts, pa.string())
    grams, _ = _content_grams(normalised_words(arr, mask_digits=True), spec.ngram)
    gram_items = np.repeat(text_items, grams.lengths)
    order = np.argsort(grams.values, kind="stable")
    sets, long_enough = _fuzzy_units(arr)
    units = np.nonzero(long_enough & (sets.lengths > 0))[0]
    unit_sets = sets.take(units)
    bands, rows = lsh_params(spec.fuzzy_threshold, FUZZY_NUM_PERM, FUZZY_FP_WEIGHT, FUZZY_FN_WEIGHT) \
        if spec.fuzzy_threshold < 1 else (FUZZY_NUM_PERM, 1)
    bh = band_hashes(minhash_signatures(unit_sets, FUZZY_NUM_PERM), bands, rows)  # (units, bands)
    band_order = np.argsort(bh.T, axis=1, kind="stable")
    return ContaminationIndex(
        ngram=spec.ngram,
        fuzzy_threshold=spec.fuzzy_threshold,
        item_ids=[item.id for item in items],
        item_snippets=[_snippet(item.texts[0]) for item in items],
        gram_hashes=grams.values[order],
        gram_items=gram_items[order],
        unit_items=text_items[units],
        unit_snippets=[_snippet(texts[u]) for u in units],
        unit_sets=unit_sets,
        bands=bands,
        rows=rows,
        band_sorted=np.take_along_axis(bh.T, band_order, axis=1),
        band_units=band_order,
    )


def _exact_hits(texts: pa.Array, index: ContaminationIndex) -> dict[int, tuple[int, str]]:
    """Row -> (item index, the shared n-gram as words) for rows sharing an n-gram with an eval text."""
    words = normalised_words(texts, mask_digits=True)
    grams, starts = _content_grams(words, index.ngram)
    if len(grams.values) == 0 or len(index.gram_hashes) == 0:
        return {}
    slot = np.minimum(np.searchsorted(index.gram_hashes, grams.values), len(index.gram_hashes) - 1)
    hit = np.nonzero(index.gram_hashes[slot] == grams.values)[0]
    out: dict[int, tuple[int, str]] = {}
    if len(hit) == 0:
        return out
    rows = np.searchsorted(grams.offsets, hit, side="right") - 1
    # An n-gram hash can belong to several items (gram_hashes holds one entry per item); expand
    # to every (row, item, gram) match and name, per row, the item sharing the most n-grams.
    lo = np.searchsorted(index.gram_hashes, grams.values[hit], side="left")
    hi = np.searchsorted(index.gram_hashes, grams.values[hit], side="right")
    n = hi - lo
    match_row, match_gram = np.repeat(rows, n), np.repeat(hit, n)
    match_item = index.gram_items[np.repeat(lo, n) + (np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n))]
    pairs, counts = np.unique(np.stack([match_row, match_item], axis=1), axis=0, return_counts=True)
    order = np.lexsort((pairs[:, 1], -counts, pairs[:, 0]))  # per row: most n-grams, then first item
    for r, item in pairs[order].tolist():
        if r in out:
            continue
        g = int(match_gram[(match_row == r) & (match_item == item)][0])
        start = int(starts[g])
        row_words = words[r].as_py()
        out[r] = (int(item), " ".join(row_words[start:start + index.ngram]))
    return out


def _fuzzy_hits(texts: pa.Array, text_rows: np.ndarray, index: ContaminationIndex,
                skip: set[int]) -> dict[int, tuple[int, float]]:
    """Row -> (unit index, exact 3-gram Jaccard) of its best-matching eval text at/above the threshold."""
    if len(index.unit_items) == 0 or len(texts) == 0:
        return {}
    sets, long_enough = _fuzzy_units(texts)
    probe = np.nonzero(long_enough & (sets.lengths > 0) & ~np.isin(text_rows, list(skip)))[0]
    if len(probe) == 0:
        return {}
    probe_sets = sets.take(probe)
    bh = band_hashes(minhash_signatures(probe_sets, FUZZY_NUM_PERM), index.bands, index.rows)
    cand_probe, cand_unit = [], []
    for j in range(index.bands):
        lo = np.searchsorted(index.band_sorted[j], bh[:, j], side="left")
        hi = np.searchsorted(index.band_sorted[j], bh[:, j], side="right")
        n = hi - lo
        if not n.any():
            continue
        p = np.repeat(np.arange(len(probe)), n)
        pos = np.repeat(lo, n) + (np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n))
        cand_probe.append(p)
        cand_unit.append(index.band_units[j][pos])
    if not cand_probe:
        return {}
    pairs = np.unique(np.stack([np.concatenate(cand_probe), np.concatenate(cand_unit)], axis=1), axis=0)
    best: dict[int, tuple[int, float]] = {}
    for p, u in pairs.tolist():
        a, b = probe_sets.row(p), index.unit_sets.row(u)
        inter = len(np.intersect1d(a, b, assume_unique=True))
        j = inter / (len(a) + len(b) - inter)
        row = int(text_rows[probe[p]])
        if j >= index.fuzzy_threshold and (row not in best or j > best[row][1]):
            best[row] = (u, j)
    return best


def _row_texts(table: pa.Table, field: str) -> tuple[pa.Array, pa.Array, np.ndarray]:
    """(joined text per row, one text per message, row of each message) for the spec's field."""
    roles = PROMPT_ROLES if field == "prompt" else None
    joined = joined_contents(table.column("messages"), roles)
    messages = table.column("messages").combine_chunks()
    flat = messages.flatten()
    parents = pc.list_parent_indices(messages).to_numpy(zero_copy_only=False).astype(np.int64)
    content = pc.struct_field(flat, "content")
    mask = pc.is_valid(content)
    if roles is not None:
        mask = pc.and_(mask, pc.is_in(pc.struct_field(flat, "role"), pa.array(sorted(roles))))
    mask = pc.fill_null(mask, False)
    units, unit_rows = content.filter(mask), parents[mask.to_numpy(zero_copy_only=False)]
    if field == "all":  # the rejected answer of a preference pair is training text too
        rejected = table.column("rejected").combine_chunks()
        has = pc.is_valid(rejected)
        joined = pc.binary_join_element_wise(joined, pc.fill_null(rejected, ""), "\n")
        units = pa.concat_arrays([units, rejected.filter(has)])
        unit_rows = np.concatenate([unit_rows, np.nonzero(has.to_numpy(zero_copy_only=False))[0]])
    return joined, units, unit_rows


def mark_contaminated(table: pa.Table, index: ContaminationIndex, spec: ContaminationSpec) -> pa.Table:
    """Drop kept rows that share an n-gram with an eval item (reason ngram_overlap) or whose text
    fuzzily matches one (reason fuzzy_match); the detail names the eval item and shows a snippet."""
    if spec.ngram != index.ngram or spec.fuzzy_threshold != index.fuzzy_threshold:
        raise ValueError(
            f"contamination index was built for ngram={index.ngram}, fuzzy_threshold={index.fuzzy_threshold}; "
            f"the spec says ngram={spec.ngram}, fuzzy_threshold={spec.fuzzy_threshold}: rebuild the index"
        )
    kept = np.nonzero(pc.fill_null(pc.equal(table.column("status"), KEPT), False).to_numpy(zero_copy_only=False))[0]
    if len(kept) == 0 or len(index) == 0:
        return table
    sub = table.take(pa.array(kept, pa.int64()))
    joined, units, unit_rows = _row_texts(sub, spec.field)
    exact = _exact_hits(joined, index)
    fuzzy = _fuzzy_hits(units, unit_rows, index, set(exact))
    updates = {}
    for r, (item, gram) in exact.items():
        updates[int(kept[r])] = {
            "status": DROPPED, "op": OP_CONTAMINATION, "reason": NGRAM_OVERLAP,
            "detail": f"shares the {index.ngram}-gram \"{gram}\" with eval item {index.item_ids[item]}: "
                      f"\"{index.item_snippets[item]}\"",
        }
    for r, (unit, j) in fuzzy.items():
        item = int(index.unit_items[unit])
        updates[int(kept[r])] = {
            "status": DROPPED, "op": OP_CONTAMINATION, "reason": FUZZY_MATCH,
            "detail": f"word {FUZZY_NGRAM}-gram Jaccard {j:.2f} >= {index.fuzzy_threshold} with eval item "
                      f"{index.item_ids[item]}: \"{index.unit_snippets[unit]}\"",
        }
    return mark_rows(table, updates)
