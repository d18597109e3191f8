"""Line-level and fuzzy (MinHash-LSH) deduplication as collect / resolve / apply triples.

Exact document dedup lives in `loraforge.data.ops` (add_content_hash / mark_duplicates). The two
global ops here are split so Ray Data can run the heavy parts per batch:

    line dedup   collect  line_hashes(table, min_line_chars)      -> one row per response line
                 resolve  first_line_owners(hashes)               -> LineOwners (first row of each line)
                 apply    remove_seen_lines(table, decision, ...) -> later copies of a line cut

    fuzzy dedup  collect  band_keys(table, spec)                  -> one row per document: LSH band
                                                                     hashes, MinHash signature, shingle set
                 resolve  fuzzy_clusters(keys, spec)              -> FuzzyDecision (who merges into whom)
                 apply    mark_fuzzy_duplicates(table, decision)

Fuzzy dedup: candidates are pairs sharing an LSH bucket in any band; each candidate is verified
with the exact Jaccard of the two shingle sets (estimated from the signatures only for rows too
long to ship their set), so a merge always means Jaccard >= threshold; verified pairs are joined
by union-find and each cluster keeps its best row by the spec's `keep` column.

Resolve steps run on the driver and are vectorised (numpy sorts and group boundaries), so 100k+
rows resolve in seconds. Only rows whose status is `kept` are collected or changed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from loraforge.data.minhash import (
    Ragged,
    band_hashes,
    distinct_sorted,
    joined_contents,
    lsh_params,
    minhash_signatures,
    text_shingles,
    word_hash,
)
from loraforge.data.ops import mark_rows
from loraforge.data.schema import DROPPED, KEPT, MERGED, OP_FUZZY_DEDUP, OP_LINE_DEDUP, ORDER_KEYS, ROW_SCHEMA
from loraforge.spec import DedupSpec

ALL_LINES_DUPLICATE = "all_lines_duplicate"
NEAR_DUPLICATE = "near_duplicate"
# An LSH bucket larger than this is linked as a star (each member with the bucket's first) plus a
# chain (each with the previous one) instead of all m(m-1)/2 pairs, so one huge bucket of
# boilerplate cannot blow up the resolve step.
MAX_BUCKET_ALL_PAIRS = 32
_PAIR_CHUNK = 65_536


def _kept_mask(table: pa.Table) -> np.ndarray:
    return pc.fill_null(pc.equal(table.column("status"), KEPT), False).to_numpy(zero_copy_only=False)


def _order_columns(table: pa.Table, rows: np.ndarray | None = None) -> dict[str, pa.Array]:
    cols = {k: table.column(k).combine_chunks() for k in ["id", *ORDER_KEYS]}
    if rows is not None:
        idx = pa.array(rows, pa.int64())
        cols = {k: v.take(idx) for k, v in cols.items()}
    return cols


def _order_rank(table: pa.Table) -> np.ndarray:
    """Position of each row in input order (ORDER_KEYS), 0 = first."""
    keys = [np.asarray(table.column(k).to_numpy(zero_copy_only=False)) for k in reversed(ORDER_KEYS)]
    order = np.lexsort(keys)
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order))
    return rank


def _set_column(table: pa.Table, name: str, values: list | np.ndarray) -> pa.Table:
    typ = ROW_SCHEMA.field(name).type
    return table.set_column(table.schema.get_field_index(name), name, pa.array(values, type=typ))


# ================================================================ line dedup
LINE_HASHES_SCHEMA = pa.schema(
    [("id", pa.string()), ("input_index", pa.int32()), ("line", pa.int64()), ("sub", pa.int32()),
     ("line_hash", pa.uint64())]
)


@dataclass(frozen=True)
class _ResponseLines:
    """Every line of every assistant message of the kept rows, flattened."""

    row: np.ndarray  # table row of each line
    message: np.ndarray  # flat message index (into messages.flatten()) of each line
    position: np.ndarray  # line number inside its message, from 0
    hashes: np.ndarray  # uint64 hash of the normalised line
    eligible: np.ndarray  # normalised line has >= min_line_chars characters


def normalise_line(line: str) -> str:
    """Whitespace runs -> one space, ends stripped, lowercased: the key line dedup compares."""
    return " ".join(line.split()).lower()


def _response_lines(table: pa.Table, min_line_chars: int) -> _ResponseLines:
    messages = table.column("messages").combine_chunks()
    flat = messages.flatten()
    msg_row = pc.list_parent_indices(messages).to_numpy(zero_copy_only=False).astype(np.int64)
    content = pc.struct_field(flat, "content")
    is_answer = pc.and_(pc.equal(pc.struct_field(flat, "role"), "assistant"), pc.is_valid(content))
    mask = pc.fill_null(is_answer, False).to_numpy(zero_copy_only=False) & _kept_mask(table)[msg_row]
    msg_ids = np.nonzero(mask)[0]
    lines = pc.split_pattern(content.filter(pa.array(mask)), "\n")
    parent = pc.list_parent_indices(lines).to_numpy(zero_copy_only=False).astype(np.int64)
    line_offsets = lines.offsets.to_numpy(zero_copy_only=False).astype(np.int64)
    position = np.arange(len(parent), dtype=np.int64) - (line_offsets[parent] - line_offsets[0])
    text = lines.flatten()
    norm = pc.utf8_lower(pc.utf8_trim_whitespace(pc.replace_substring_regex(text, r"\s+", " ")))
    eligible = pc.greater_equal(pc.utf8_length(norm), min_line_chars).to_numpy(zero_copy_only=False)
    hashes = np.zeros(len(norm), dtype=np.uint64)
    if len(norm):
        encoded = pc.dictionary_encode(norm)
        vocab = np.fromiter((word_hash(s) for s in encoded.dictionary.to_pylist()), np.uint64,
                            count=len(encoded.dictionary))
        hashes = vocab[encoded.indices.to_numpy(zero_copy_only=False)]
    message = msg_ids[parent]
    return _ResponseLines(msg_row[message], message, position, hashes, eligible)


def line_hashes(table: pa.Table, min_line_chars: int) -> pa.Table:
    """Collect: one row (id, ORDER_KEYS, line_hash) per eligible response line of each kept row.

    Response = assistant messages (a text document is one); lines are split on newlines and
    normalised with `normalise_line`; lines shorter than min_line_chars are left out.
    """
    if min_line_chars < 1:
        raise ValueError(f"min_line_chars must be >= 1, got {min_line_chars}")
    lines = _response_lines(table, min_line_chars)
    rows = lines.row[lines.eligible]
    cols = _order_columns(table, rows)
    cols["line_hash"] = pa.array(lines.hashes[lines.eligible], pa.uint64())
    return pa.table(cols, schema=LINE_HASHES_SCHEMA)


@dataclass
class LineOwners:
    """For each distinct line hash (sorted), the first row in input order that has it."""

    hashes: np.ndarray  # uint64, sorted, unique
    input_index: np.ndarray
    line: np.ndarray
    sub: np.ndarray
    owner_id: list[str]

    def __len__(self) -> int:
        return len(self.hashes)


def first_line_owners(hashes: pa.Table) -> LineOwners:
    """Resolve: the owner of each line hash is the earliest row (ORDER_KEYS) among those having it."""
    if hashes.num_rows == 0:  # nothing collected (the Ray glue returns a column-less table then)
        return LineOwners(np.zeros(0, np.uint64), *(np.zeros(0, np.int64) for _ in range(3)), [])
    missing = set(LINE_HASHES_SCHEMA.names) - set(hashes.column_names)
    if missing:
        raise ValueError(f"line hashes table lacks columns {sorted(missing)} (build it with line_hashes)")
    h = hashes.column("line_hash").to_numpy().astype(np.uint64)
    ii = hashes.column("input_index").to_numpy().astype(np.int64)
    ln = hashes.column("line").to_numpy().astype(np.int64)
    sb = hashes.column("sub").to_numpy().astype(np.int64)
    order = np.lexsort((sb, ln, ii, h))
    h_sorted = h[order]
    first = np.ones(len(order), dtype=bool)
    first[1:] = h_sorted[1:] != h_sorted[:-1]
    pick = order[first]
    ids = hashes.column("id").combine_chunks().take(pa.array(pick, pa.int64())).to_pylist()
    return LineOwners(h[pick], ii[pick], ln[pick], sb[pick], ids)


def remove_seen_lines(table: pa.Table, decision: LineOwners, min_line_chars: int) -> pa.Table:
    """Apply: cut from each kept row's assistant messages the lines whose owner is another row.

    A row keeps every copy of the lines it owns (repetition inside one answer is the filters'
    business). `lines_removed` counts the cuts; a row whose response becomes empty is dropped with
    op `line_dedup`, reason `all_lines_duplicate`. Lines shorter than min_line_chars are never cut.
    """
    owners = decision
    lines = _response_lines(table, min_line_chars)
    kept = _kept_mask(table)
    removed = np.zeros(table.num_rows, dtype=np.int64)
    cut = np.zeros(len(lines.row), dtype=bool)
    if len(owners) and len(lines.row):
        slot = np.searchsorted(owners.hashes, lines.hashes)
        slot = np.minimum(slot, len(owners) - 1)
        known = (owners.hashes[slot] == lines.hashes) & lines.eligible
        ii = table.column("input_index").to_numpy(zero_copy_only=False).astype(np.int64)[lines.row]
        ln = table.column("line").to_numpy(zero_copy_only=False).astype(np.int64)[lines.row]
        sb = table.column("sub").to_numpy(zero_copy_only=False).astype(np.int64)[lines.row]
        mine = (owners.input_index[slot] == ii) & (owners.line[slot] == ln) & (owners.sub[slot] == sb)
        cut = known & ~mine
        removed = np.bincount(lines.row[cut], minlength=table.num_rows)
    counts = table.column("lines_removed").to_pylist()
    for pos in np.nonzero(kept)[0]:
        counts[pos] = (counts[pos] or 0) + int(removed[pos])
    table = _set_column(table, "lines_removed", counts)
    if not cut.any():
        return table
    # Rewrite only the messages that lose lines.
    by_message: dict[int, set[int]] = {}
    first_owner: dict[int, str] = {}
    for m, p, r, s in zip(lines.message[cut], lines.position[cut], lines.row[cut], slot[cut], strict=True):
        by_message.setdefault(int(m), set()).add(int(p))
        first_owner.setdefault(int(r), owners.owner_id[int(s)])
    messages = table.column("messages").to_pylist()
    flat_index = 0
    updates = {}
    for pos, conv in enumerate(messages):
        if conv is None:
            continue
        touched = False
        for msg in conv:
            drop = by_message.get(flat_index)
            flat_index += 1
            if drop is not None:
                msg["content"] = "\n".join(t for i, t in enumerate(msg["content"].split("\n")) if i not in drop)
                touched = True
        if touched and not any(m["content"].strip() for m in conv if m["role"] == "assistant"):
            updates[pos] = {
                "status": DROPPED, "op": OP_LINE_DEDUP, "reason": ALL_LINES_DUPLICATE,
                "detail": f"all {removed[pos]} response line(s) appear earlier in the corpus "
                          f"(first cut line seen first in {first_owner[pos]})",
            }
    table = _set_column(table, "messages", messages)
    chars = table.column("text_chars").to_pylist()
    for pos in np.unique(lines.row[cut]):
        chars[pos] = sum(len(m["content"]) for m in messages[pos])
    table = _set_column(table, "text_chars", chars)
    return mark_rows(table, updates)


# ================================================================ fuzzy dedup
# LSH weighting: every candidate pair is verified, with the exact Jaccard of its shingle sets, so a
# false candidate costs one set intersection while a missed pair is lost for good: misses weigh 49x.
# At threshold 0.8 and 128 permutations this gives 17 bands x 7 rows: P(candidate) = 0.98 at J = 0.8.
FUZZY_FP_WEIGHT, FUZZY_FN_WEIGHT = 0.02, 0.98
# Rows with more distinct shingles than this carry no shingle set to the driver (memory); their
# candidate pairs are verified with the signature estimate instead (128 permutations: +-0.035).
MAX_EXACT_SHINGLES = 4096


def fuzzy_lsh_params(spec: DedupSpec) -> tuple[int, int]:
    """(bands, rows) used by band_keys: recall-weighted, as every candidate is verified afterwards."""
    return lsh_params(spec.threshold, spec.num_perm, FUZZY_FP_WEIGHT, FUZZY_FN_WEIGHT)


def band_keys_schema(bands: int, num_perm: int) -> pa.Schema:
    return pa.schema(
        [("id", pa.string()), ("input_index", pa.int32()), ("line", pa.int64()), ("sub", pa.int32()),
         ("keep", pa.float64()),
         ("band_hashes", pa.list_(pa.uint64(), bands)),  # position = band index
         ("signature", pa.list_(pa.uint32(), num_perm)),
         ("shingles", pa.list_(pa.uint32()))]  # sorted distinct shingle hashes; null above MAX_EXACT_SHINGLES
    )


def _keep_scores(table: pa.Table, column: str) -> np.ndarray:
    if column not in table.column_names:
        raise ValueError(f"dedup.keep names column {column!r}, which the rows do not have")
    col = table.column(column)
    if not (pa.types.is_integer(col.type) or pa.types.is_floating(col.type) or pa.types.is_boolean(col.type)):
        raise ValueError(f"dedup.keep column {column!r} must be numeric, it is {col.type}")
    values = col.cast(pa.float64()).to_numpy(zero_copy_only=False)
    return np.where(np.isnan(values), -np.inf, values)  # null / NaN: lowest priority


def document_texts(table: pa.Table) -> pa.Array:
    """The text fuzzy dedup compares: every message of the row, joined by newlines."""
    return joined_contents(table.column("messages"))


def band_keys(table: pa.Table, spec: DedupSpec) -> pa.Table:
    """Collect: per kept row with at least one word, its LSH band hashes, MinHash signature and
    (up to MAX_EXACT_SHINGLES) its shingle set, for exact verification on the driver.

    Shingles are word `spec.ngram`-grams of the normalised text of all messages (a row shorter than
    n words is one shingle of all its words). The keep score is `spec.keep` (null -> -inf).
    """
    bands, rows = fuzzy_lsh_params(spec)
    schema = band_keys_schema(bands, spec.num_perm)
    kept = np.nonzero(_kept_mask(table))[0]
    if len(kept) == 0:
        return schema.empty_table()
    sub = table.take(pa.array(kept, pa.int64()))
    keep = _keep_scores(sub, spec.keep)
    shingles = distinct_sorted(text_shingles(document_texts(sub), spec.ngram))
    has = np.nonzero(shingles.lengths > 0)[0]
    sig = minhash_signatures(shingles, spec.num_perm)[has]
    bh = band_hashes(sig, bands, rows)
    # The sets travel as the top 32 bits of each shingle hash (half the bytes; a false shared
    # shingle between two rows of 100 shingles has odds ~1e-6 and moves their Jaccard by ~0.005).
    # Rows above the cap lose theirs (null list) to keep the collected table small.
    too_long = shingles.lengths > MAX_EXACT_SHINGLES
    owner = np.repeat(np.arange(len(shingles)), shingles.lengths)
    values = (shingles.values >> np.uint64(32)).astype(np.uint32)
    fresh = np.ones(len(values), dtype=bool)  # sorted per row, so repeats after truncation are adjacent
    fresh[1:] = (values[1:] != values[:-1]) | (owner[1:] != owner[:-1])
    keep_value = fresh & ~too_long[owner]
    values = values[keep_value]
    lengths = np.bincount(owner[keep_value], minlength=len(shingles))[has]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    too_long = pa.array(too_long[has])
    cols = _order_columns(sub, has)
    cols["keep"] = pa.array(keep[has], pa.float64())
    cols["band_hashes"] = pa.FixedSizeListArray.from_arrays(pa.array(bh.ravel(), pa.uint64()), bands)
    cols["signature"] = pa.FixedSizeListArray.from_arrays(pa.array(sig.ravel(), pa.uint32()), spec.num_perm)
    cols["shingles"] = pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(values, pa.uint32()),
                                                mask=too_long)
    return pa.table(cols, schema=schema)


class UnionFind:
    """Disjoint sets over 0..n-1 with path compression and union by rank."""

    def __init__(self, n: int):
        self.parent = list(range(n))
        self.rank = [0] * n

    def find(self, x: int) -> int:
        root = x
        parent = self.parent
        while parent[root] != root:
            root = parent[root]
        while parent[x] != root:  # compress: point the whole path at the root
            parent[x], x = root, parent[x]
        return root

    def union(self, a: int, b: int) -> bool:
        """Join the sets of a and b; False if they were already one set."""
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return False
        if self.rank[ra] < self.rank[rb]:
            ra, rb = rb, ra
        self.parent[rb] = ra
        if self.rank[ra] == self.rank[rb]:
            self.rank[ra] += 1
        return True

    def roots(self) -> np.ndarray:
        return np.fromiter((self.find(i) for i in range(len(self.parent))), np.int64, count=len(self.parent))


@dataclass
class FuzzyDecision:
    """Who merges into whom. Picklable; the apply step only reads `merged` and `keep_column`."""

    # row id -> (kept row id, Jaccard with it, cluster size, True if exact / False if estimated)
    merged: dict[str, tuple[str, float, int, bool]]
    pairs: list[tuple[str, str, float]] = field(default_factory=list)  # verified pairs (id, id, Jaccard)
    candidates: int = 0  # distinct candidate pairs from shared buckets, before verification
    estimated: int = 0  # candidates verified by signature estimate (a row above MAX_EXACT_SHINGLES)
    clusters: int = 0  # clusters of two or more rows
    keep_column: str = "heuristic_score"  # the score that picked each cluster's kept row

    def summary(self) -> dict[str, int]:
        return {"candidates": self.candidates, "verified_pairs": len(self.pairs), "estimated": self.estimated,
                "clusters": self.clusters, "merged": len(self.merged)}


def _bucket_pairs(hashes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs (i < j, by row position) of rows sharing a hash value in one band."""
    order = np.argsort(hashes, kind="stable")  # stable: members of a bucket stay in input order
    h = hashes[order]
    n = len(h)
    if n < 2:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    starts = np.nonzero(np.concatenate([[True], h[1:] != h[:-1]]))[0]
    sizes = np.diff(np.concatenate([starts, [n]]))
    lo_parts, hi_parts = [], []
    for m in np.unique(sizes[sizes >= 2]):
        run = starts[sizes == m][:, None]
        if m <= MAX_BUCKET_ALL_PAIRS:
            a, b = np.triu_indices(int(m), 1)
        else:
            k = np.arange(1, int(m))
            a, b = np.concatenate([np.zeros_like(k), k[1:] - 1]), np.concatenate([k, k[1:]])
        lo_parts.append((run + a[None, :]).ravel())
        hi_parts.append((run + b[None, :]).ravel())
    if not lo_parts:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    lo, hi = order[np.concatenate(lo_parts)], order[np.concatenate(hi_parts)]
    return np.minimum(lo, hi), np.maximum(lo, hi)


def _estimates(sig: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    out = np.empty(len(lo), dtype=np.float64)
    for c in range(0, len(lo), _PAIR_CHUNK):
        sl = slice(c, c + _PAIR_CHUNK)
        out[sl] = np.count_nonzero(sig[lo[sl]] == sig[hi[sl]], axis=1)
    return out / sig.shape[1]


def exact_jaccards(sets: Ragged, lo: np.ndarray, hi: np.ndarray, chunk_values: int = 2_000_000) -> np.ndarray:
    """Exact Jaccard of sorted distinct sets lo[k] and hi[k], vectorised: a value shared by both
    sets of a pair shows up twice next to itself once the pair's values are sorted together."""
    out = np.empty(len(lo), dtype=np.float64)
    sizes = sets.lengths[lo] + sets.lengths[hi]
    cum = np.cumsum(sizes)
    start = 0
    while start < len(lo):  # chunks of about chunk_values values
        base = int(cum[start - 1]) if start else 0
        stop = max(start + 1, int(np.searchsorted(cum, base + chunk_values, side="right")))
        a, b = sets.take(lo[start:stop]), sets.take(hi[start:stop])
        k = np.arange(stop - start)
        vals = np.concatenate([a.values, b.values])
        pair = np.concatenate([np.repeat(k, a.lengths), np.repeat(k, b.lengths)])
        order = np.lexsort((vals, pair))
        vals, pair = vals[order], pair[order]
        shared = (vals[1:] == vals[:-1]) & (pair[1:] == pair[:-1])
        inter = np.bincount(pair[1:][shared], minlength=stop - start)
        union = sizes[start:stop] - inter
        out[start:stop] = np.where(union > 0, inter / np.maximum(union, 1), 1.0)
        start = stop
    return out


def _jaccards(sets: Ragged, exact_ok: np.ndarray, sig: np.ndarray, lo: np.ndarray, hi: np.ndarray
              ) -> tuple[np.ndarray, np.ndarray]:
    """(Jaccard of each pair, True where exact): exact when both rows carry their set, else estimated."""
    both = exact_ok[lo] & exact_ok[hi]
    j = np.empty(len(lo), dtype=np.float64)
    j[both] = exact_jaccards(sets, lo[both], hi[both])
    j[~both] = _estimates(sig, lo[~both], hi[~both])
    return j, both


def fuzzy_clusters(keys: pa.Table, spec: DedupSpec) -> FuzzyDecision:
    """Resolve: candidates from shared LSH buckets, kept if their Jaccard >= threshold (exact on the
    shingle sets; estimated from signatures for rows too long to carry theirs), joined by union-find;
    each cluster keeps its highest `keep` score (ties: earliest row), the others merge into it."""
    bands, _rows = fuzzy_lsh_params(spec)
    n = keys.num_rows
    if n == 0:
        return FuzzyDecision({}, keep_column=spec.keep)
    ids = keys.column("id").to_pylist()
    if len(set(ids)) != n:
        raise ValueError("band keys hold repeated row ids: collect each row once")
    # Row positions follow input order from here on, so "first" and tie-breaks are input order.
    by_rank = np.argsort(_order_rank(keys))
    keys = keys.take(pa.array(by_rank, pa.int64()))
    ids = [ids[i] for i in by_rank]
    keep = keys.column("keep").to_numpy(zero_copy_only=False)
    keep = np.where(np.isnan(keep), -np.inf, keep)
    bh_col = keys.column("band_hashes").combine_chunks()
    sig_col = keys.column("signature").combine_chunks()
    if bh_col.type.list_size != bands or sig_col.type.list_size != spec.num_perm:
        raise ValueError(
            f"band keys were built with {bh_col.type.list_size} bands / {sig_col.type.list_size} permutations, "
            f"the spec asks for {bands} / {spec.num_perm}: collect and resolve with the same DedupSpec"
        )
    bh = bh_col.flatten().to_numpy().reshape(n, bands)
    sig = sig_col.flatten().to_numpy().reshape(n, spec.num_perm)
    sh_col = keys.column("shingles").combine_chunks()
    exact_ok = sh_col.is_valid().to_numpy(zero_copy_only=False)
    sh_offsets = np.asarray(sh_col.offsets.to_numpy(zero_copy_only=False), dtype=np.int64)
    sets = Ragged(sh_col.values.to_numpy(zero_copy_only=False)[sh_offsets[0]:sh_offsets[-1]],
                  sh_offsets - sh_offsets[0])

    packed = []
    for j in range(bands):
        lo, hi = _bucket_pairs(bh[:, j])
        packed.append(lo * n + hi)
    pairs = np.unique(np.concatenate(packed))
    lo, hi = pairs // n, pairs % n
    jac, exact = _jaccards(sets, exact_ok, sig, lo, hi)
    ok = jac >= spec.threshold - 1e-12
    estimated = int((~exact).sum())
    lo, hi, jac = lo[ok], hi[ok], jac[ok]

    uf = UnionFind(n)
    for a, b in zip(lo.tolist(), hi.tolist(), strict=True):
        uf.union(a, b)
    roots = uf.roots()
    size = np.bincount(roots, minlength=n)
    # Best member per cluster: highest keep, then earliest (position = input rank).
    members = np.nonzero(size[roots] >= 2)[0]
    members = members[np.lexsort((members, -keep[members], roots[members]))]
    first = np.concatenate([[True], roots[members][1:] != roots[members][:-1]]) if len(members) else np.zeros(0, bool)
    best_of_root = dict(zip(roots[members[first]].tolist(), members[first].tolist(), strict=True))
    losers = members[~first]
    winners = np.array([best_of_root[r] for r in roots[losers].tolist()], dtype=np.int64)
    j_kept, exact_kept = _jaccards(sets, exact_ok, sig, losers, winners)
    merged = {
        ids[a]: (ids[b], float(j), int(size[roots[a]]), bool(e))
        for a, b, j, e in zip(losers.tolist(), winners.tolist(), j_kept.tolist(), exact_kept.tolist(), strict=True)
    }
    verified = [(ids[a], ids[b], float(j)) for a, b, j in zip(lo.tolist(), hi.tolist(), jac.tolist(), strict=True)]
    return FuzzyDecision(merged, verified, candidates=len(pairs), estimated=estimated,
                         clusters=len(best_of_root), keep_column=spec.keep)


def mark_fuzzy_duplicates(table: pa.Table, decision: FuzzyDecision) -> pa.Table:
    """Apply: kept rows named in the decision become `merged` into their cluster's kept row.

    Rows an earlier op merged into a row that this op merges (an exact copy of a near-duplicate)
    are re-pointed at the cluster's kept row, so every merged row still names a kept row.
    """
    if not decision.merged:
        return table
    ids = table.column("id").to_pylist()
    kept = _kept_mask(table)
    statuses = table.column("status").to_pylist()
    targets = table.column("merged_into").to_pylist()
    details = table.column("detail").to_pylist()
    updates = {}
    for pos, row_id in enumerate(ids):
        if statuses[pos] == MERGED and targets[pos] in decision.merged:
            into = decision.merged[targets[pos]][0]
            note = f"{targets[pos]} merged into {into} by {OP_FUZZY_DEDUP}"
            updates[pos] = {"merged_into": into, "detail": f"{details[pos]}; {note}" if details[pos] else note}
            continue
        hit = decision.merged.get(row_id)
        if hit is None or not kept[pos]:
            continue
        into, j, size, exact = hit
        how = "Jaccard" if exact else "estimated Jaccard"
        updates[pos] = {
            "status": MERGED, "op": OP_FUZZY_DEDUP, "reason": NEAR_DUPLICATE, "merged_into": into,
            "detail": f"near-duplicate of {into} ({how} {j:.2f} with it; cluster of {size}, "
                      f"kept the best by {decision.keep_column})",
        }
    return mark_rows(table, updates)
