"""Text -> normalised words -> hashed word n-grams -> MinHash signatures -> LSH band keys, vectorised.

Everything here works on whole batches (Arrow string arrays in, numpy arrays out) so a batch of
10k rows costs a few numpy passes, not 10k Python calls:

- words: NFKD without combining marks, lowercase, punctuation and symbols -> space, split on
  whitespace (pyarrow kernels);
- word hashes: blake2b of each *distinct* word of the batch (the only per-item Python loop);
- n-gram hashes: a position-weighted sum of the word hashes, mixed (splitmix64), one numpy pass per
  word position;
- MinHash: `num_perm` universal hashes h(x) = (a*x + b) mod p over 31-bit shingle hashes with the
  Mersenne prime p = 2^31 - 1, so a*x + b < 2^63 never overflows uint64 and the reduction is a
  mask, a shift, an add and two conditional subtractions (exact, no division), laid out
  permutations x shingles so the per-row minimum streams through memory;
- LSH: `lsh_params` picks bands x rows minimising the weighted false-positive + false-negative area
  under the banding S-curve P(s) = 1 - (1 - s^r)^b.

All hashes are deterministic (no Python `hash()`), so every Ray worker computes the same keys.
"""

from __future__ import annotations

import hashlib
import unicodedata
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

MERSENNE_31 = (1 << 31) - 1
EMPTY_SIGNATURE_VALUE = np.uint32(0xFFFFFFFF)  # signature of a row without shingles (never a real value)
# Shingles per numpy chunk of the signature computation: num_perm x chunk uint64 = 4 MiB at 128
# permutations, two such buffers stay in cache (16k-shingle chunks ran 2x slower).
SIGNATURE_CHUNK = 4096

_U64 = np.uint64
_MIX1, _MIX2 = _U64(0xBF58476D1CE4E5B9), _U64(0x94D049BB133111EB)
# One odd multiplier per position inside an n-gram (up to 64 words), fixed forever.
_POSITION_MULT = (
    np.random.default_rng(0x5EED).integers(1, 1 << 63, size=64, dtype=np.uint64) * _U64(2) + _U64(1)
)


# ---------------------------------------------------------------- text
def joined_contents(messages: pa.Array | pa.ChunkedArray, roles: frozenset[str] | None = None,
                    sep: str = "\n") -> pa.Array:
    """Per row, the contents of its messages (only `roles`, if given) joined by `sep`; "" for none.

    `messages` is a list<struct<role, content>> column; null rows and null contents count as empty.
    """
    if isinstance(messages, pa.ChunkedArray):
        messages = messages.combine_chunks() if messages.num_chunks else pa.array([], messages.type)
    n = len(messages)
    flat = messages.flatten()
    parents = pc.list_parent_indices(messages).to_numpy(zero_copy_only=False)
    content = pc.struct_field(flat, "content")
    mask = pc.is_valid(content)
    if roles is not None:
        mask = pc.and_(mask, pc.is_in(pc.struct_field(flat, "role"), pa.array(sorted(roles), pa.string())))
    mask_np = mask.to_numpy(zero_copy_only=False)
    counts = np.bincount(parents[mask_np], minlength=n) if n else np.zeros(0, np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    lists = pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), content.filter(mask))
    return pc.binary_join(lists, sep)


def normalised_words(texts: pa.Array | pa.ChunkedArray, mask_digits: bool = False) -> pa.ListArray:
    """Per text, its words: NFKD minus accents, lowercased, punctuation/symbols -> space, split on whitespace.

    mask_digits: every run of digits becomes "0" (contamination: a changed number is not a new text).
    """
    if isinstance(texts, pa.ChunkedArray):
        texts = texts.combine_chunks() if texts.num_chunks else pa.array([], pa.string())
    texts = pc.fill_null(texts, "")
    t = pc.ascii_lower(texts)
    # Non-ASCII texts only: NFKD, drop the combining marks ("café", "cafe\u0301" and "cafe" become
    # one word), full Unicode lowercase. (NFKD also because pyarrow's NFC/NFKC kernels return
    # decomposed text, at least in pyarrow 25.) Most texts are ASCII and skip these kernels.
    non_ascii = pc.invert(pc.string_is_ascii(t))
    if pc.any(non_ascii).as_py():
        sub = pc.utf8_lower(pc.replace_substring_regex(pc.utf8_normalize(t.filter(non_ascii), "NFKD"), r"\p{Mn}+", ""))
        t = pc.replace_with_mask(t, non_ascii, sub)
    t = pc.replace_substring_regex(t, r"[\p{P}\p{S}]+", " ")
    if mask_digits:
        t = pc.replace_substring_regex(t, r"[0-9]+", "0")
    t = pc.utf8_trim_whitespace(t)
    words = pc.utf8_split_whitespace(t)
    # After trimming, only an empty text splits into an empty word ("" -> [""]): drop those.
    if not pc.any(pc.equal(pc.binary_length(t), 0)).as_py():
        return words
    flat = words.flatten()
    parents = pc.list_parent_indices(words).to_numpy(zero_copy_only=False)
    nonempty = pc.greater(pc.binary_length(flat), 0)
    keep = nonempty.to_numpy(zero_copy_only=False)
    counts = np.bincount(parents[keep], minlength=len(words))
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), flat.filter(nonempty))


def normalise_text(text: str, mask_digits: bool = False) -> list[str]:
    """Pure-Python reference of `normalised_words` for one text (tests and small callers)."""
    t = "".join(c for c in unicodedata.normalize("NFKD", text) if unicodedata.category(c) != "Mn").lower()
    t = "".join(" " if unicodedata.category(c)[0] in "PS" else c for c in t)
    if mask_digits:
        out, prev_digit = [], False
        for c in t:
            is_digit = "0" <= c <= "9"
            if not (is_digit and prev_digit):
                out.append("0" if is_digit else c)
            prev_digit = is_digit
        t = "".join(out)
    return t.split()


def shingle_set(text: str, n: int, short: str = "whole", mask_digits: bool = False) -> set[tuple[str, ...]]:
    """Reference word n-gram set of one text (tuples of words); see `shingle_hashes` for `short`."""
    words = normalise_text(text, mask_digits)
    if len(words) < n:
        return {tuple(words)} if words and short == "whole" else set()
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def jaccard(a: set, b: set) -> float:
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


# ---------------------------------------------------------------- hashing
def word_hash(word: str) -> int:
    return int.from_bytes(hashlib.blake2b(word.encode("utf-8"), digest_size=8).digest(), "little")


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser, in place: spreads every input bit over the whole 64-bit word."""
    x ^= x >> _U64(30)
    x *= _MIX1
    x ^= x >> _U64(27)
    x *= _MIX2
    x ^= x >> _U64(31)
    return x


@dataclass(frozen=True)
class Ragged:
    """A flat array with row offsets: row i is values[offsets[i]:offsets[i + 1]]."""

    values: np.ndarray
    offsets: np.ndarray  # int64, len = rows + 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def row(self, i: int) -> np.ndarray:
        return self.values[self.offsets[i]:self.offsets[i + 1]]

    def take(self, rows: np.ndarray) -> Ragged:
        """The given rows, in that order, as a new Ragged (vectorised gather)."""
        rows = np.asarray(rows, dtype=np.int64)
        starts = self.offsets[rows]
        lengths = self.offsets[rows + 1] - starts
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        flat = np.repeat(starts - offsets[:-1], lengths) + np.arange(int(offsets[-1]))
        return Ragged(self.values[flat], offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1


def word_hashes(words: pa.ListArray) -> Ragged:
    """64-bit hash of every word, ragged by row. Distinct words are hashed once per batch."""
    flat = words.flatten()
    offsets = np.asarray(words.offsets.to_numpy(zero_copy_only=False), dtype=np.int64)
    offsets = offsets - offsets[0]
    if len(flat) == 0:
        return Ragged(np.zeros(0, np.uint64), offsets)
    encoded = pc.dictionary_encode(flat)
    vocab = np.fromiter((word_hash(w) for w in encoded.dictionary.to_pylist()), np.uint64,
                        count=len(encoded.dictionary))
    return Ragged(vocab[encoded.indices.to_numpy(zero_copy_only=False)], offsets)


def shingle_hashes(words: Ragged, n: int, short: str = "whole") -> Ragged:
    """Hash of every word n-gram (overlapping, in order), ragged by row.

    A row with 1..n-1 words gets one shingle of all its words (`short="whole"`) or none
    (`short="none"`); a row without words gets none. Equal n-grams hash equal in any row or batch.
    """
    if not 1 <= n <= len(_POSITION_MULT):
        raise ValueError(f"n-gram length must be in 1..{len(_POSITION_MULT)}, got {n}")
    if short not in ("whole", "none"):
        raise ValueError(f"short must be 'whole' or 'none', got {short!r}")
    lengths = words.lengths
    counts = np.maximum(lengths - n + 1, 0)
    if short == "whole":
        counts = np.where((lengths > 0) & (lengths < n), 1, counts)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    total = int(offsets[-1])
    if total == 0:
        return Ragged(np.zeros(0, np.uint64), offsets)
    values, word_offsets = words.values, words.offsets
    h = np.empty(total, dtype=np.uint64)
    is_short = (lengths > 0) & (lengths < n) & (counts == 1)
    short_slots = offsets[:-1][is_short]  # the one output slot of each short row
    long_rows = lengths >= n
    if long_rows.any():
        # Every n-word window of the flat word array from contiguous slices (one pass per word
        # position); windows that run past their row's end are then masked out, which leaves the
        # rows' shingles in output order.
        m = len(values) - n + 1
        acc = values[:m] * _POSITION_MULT[0]
        term = np.empty_like(acc)
        for j in range(1, n):
            np.multiply(values[j:j + m], _POSITION_MULT[j], out=term)
            acc += term
        acc += _U64(n)  # the length is part of the hash: a short whole-row shingle is its own kind
        starts_ok = np.ones(len(values), dtype=bool)
        ends = word_offsets[1:][long_rows]
        starts_ok[(ends[:, None] - np.arange(1, n)[None, :]).ravel()] = False
        few_starts, few_lengths = word_offsets[:-1][~long_rows], lengths[~long_rows]  # rows under n words
        k = np.arange(max(n - 1, 1))[None, :]
        starts_ok[(few_starts[:, None] + k)[k < few_lengths[:, None]]] = False
        slots = np.ones(total, dtype=bool)
        slots[short_slots] = False
        h[slots] = acc[starts_ok[:m]]
    if len(short_slots):  # rows with 1..n-1 words: one shingle of all their words
        s_starts, s_span = word_offsets[:-1][is_short], lengths[is_short]
        hs = s_span.astype(np.uint64)
        for j in range(n - 1):
            term = values[np.minimum(s_starts + j, len(values) - 1)] * _POSITION_MULT[j]
            hs += np.where(j < s_span, term, _U64(0))
        h[short_slots] = hs
    return Ragged(_mix64(h), offsets)


def distinct_sorted(shingles: Ragged) -> Ragged:
    """Each row's values sorted with repeats removed (sets, for exact Jaccard).

    Values keep their top 40 bits (the low 24 are zeroed) so that row and value fit one uint64 sort
    key; two different shingles then collide with probability 2^-40, which changes no Jaccard.
    """
    n_rows = len(shingles)
    if len(shingles.values) == 0:
        return shingles
    if n_rows >= 1 << 24:
        raise ValueError(f"distinct_sorted handles up to {1 << 24} rows per batch, got {n_rows}")
    rows = np.repeat(np.arange(n_rows, dtype=np.uint64), shingles.lengths)
    key = np.sort((rows << _U64(40)) | (shingles.values >> _U64(24)))
    first = np.ones(len(key), dtype=bool)
    first[1:] = key[1:] != key[:-1]
    key = key[first]
    counts = np.bincount((key >> _U64(40)).astype(np.int64), minlength=n_rows)
    values = (key & _U64((1 << 40) - 1)) << _U64(24)
    return Ragged(values, np.concatenate([[0], np.cumsum(counts)]).astype(np.int64))


def text_shingles(texts: pa.Array | pa.ChunkedArray, n: int, short: str = "whole",
                  mask_digits: bool = False) -> Ragged:
    """Strings -> hashed word n-grams per string (duplicates within a row kept; use sets downstream)."""
    return shingle_hashes(word_hashes(normalised_words(texts, mask_digits)), n, short)


# ---------------------------------------------------------------- MinHash
@lru_cache(maxsize=16)
def _permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a = rng.integers(1, MERSENNE_31, size=num_perm, dtype=np.uint64)
    b = rng.integers(0, MERSENNE_31, size=num_perm, dtype=np.uint64)
    return a, b


def minhash_signatures(shingles: Ragged, num_perm: int, seed: int = 1) -> np.ndarray:
    """(rows, num_perm) uint32 MinHash signatures; rows without shingles are all EMPTY_SIGNATURE_VALUE.

    Permutation k maps a shingle x (top 31 bits of its hash) to (a_k x + b_k) mod (2^31 - 1); the
    signature is the minimum over the row's shingles. P[sig_A[k] == sig_B[k]] = Jaccard(A, B).
    """
    a, b = _permutations(num_perm, seed)
    a, b = a[:, None], b[:, None]
    p = _U64(MERSENNE_31)
    n_rows = len(shingles)
    sig = np.full((n_rows, num_perm), np.uint64(EMPTY_SIGNATURE_VALUE), dtype=np.uint64)
    x_all = shingles.values >> _U64(33)
    offsets = shingles.offsets
    total = len(x_all)
    # Permutations x shingles, so each row's shingles are contiguous along the last axis and the
    # per-row minimum (reduceat on axis 1) streams through memory: ~8x faster than on axis 0.
    buf = np.empty((num_perm, SIGNATURE_CHUNK), dtype=np.uint64)
    tmp = np.empty_like(buf)
    for c0 in range(0, total, SIGNATURE_CHUNK):
        c1 = min(c0 + SIGNATURE_CHUNK, total)
        k = c1 - c0
        y, t = buf[:, :k], tmp[:, :k]
        np.multiply(a, x_all[None, c0:c1], out=y)
        y += b
        # y mod p for y < 2^62 + 2^31: (y & p) + (y >> 31) < 2p + 3, then two conditional
        # subtractions, each as min(r, r - p): r - p wraps around to a huge value exactly when r < p.
        np.right_shift(y, _U64(31), out=t)
        y &= p
        y += t
        np.subtract(y, p, out=t)
        np.minimum(y, t, out=y)
        np.subtract(y, p, out=t)
        np.minimum(y, t, out=y)
        # rows overlapping this chunk, and where each one's shingles start inside it
        r0 = int(np.searchsorted(offsets, c0, side="right")) - 1
        r1 = int(np.searchsorted(offsets, c1, side="left"))
        rows = np.arange(r0, r1)
        seg = np.clip(offsets[rows], c0, c1) - c0
        has = offsets[rows + 1] > offsets[rows]
        rows, seg = rows[has], seg[has]
        if len(rows) == 0:
            continue
        partial = np.minimum.reduceat(y, seg, axis=1)
        sig[rows] = np.minimum(sig[rows], partial.T)
    return sig.astype(np.uint32)


def estimated_jaccard(sig_a: np.ndarray, sig_b: np.ndarray) -> np.ndarray:
    """Share of equal signature positions, row by row (the MinHash estimate of Jaccard)."""
    return np.mean(sig_a == sig_b, axis=-1)


# ---------------------------------------------------------------- LSH
def s_curve(s: np.ndarray | float, bands: int, rows: int) -> np.ndarray:
    """P(two sets of Jaccard s share at least one band) = 1 - (1 - s^rows)^bands."""
    return 1.0 - (1.0 - np.asarray(s, dtype=np.float64) ** rows) ** bands


def lsh_errors(threshold: float, bands: int, rows: int, grid: int = 2001) -> tuple[float, float]:
    """(false-positive area: integral of P over [0, t], false-negative area: of 1 - P over [t, 1])."""
    lo = np.linspace(0.0, threshold, grid)
    hi = np.linspace(threshold, 1.0, grid)
    return float(np.trapezoid(s_curve(lo, bands, rows), lo)), float(np.trapezoid(1 - s_curve(hi, bands, rows), hi))


@lru_cache(maxsize=64)
def lsh_params(threshold: float, num_perm: int, fp_weight: float = 0.5, fn_weight: float = 0.5) -> tuple[int, int]:
    """(bands, rows) with bands * rows <= num_perm minimising fp_weight * FP + fn_weight * FN areas.

    Equal weights put the S-curve's midpoint near the threshold; when candidates are verified
    afterwards a larger fn_weight moves the curve left, so pairs just above the threshold are found.
    """
    if not 0 < threshold < 1:
        raise ValueError(f"threshold must be in (0, 1), got {threshold}")
    if num_perm < 1:
        raise ValueError(f"num_perm must be >= 1, got {num_perm}")
    best: tuple[float, int, int] | None = None
    for bands in range(1, num_perm + 1):
        for rows in range(1, num_perm // bands + 1):
            fp, fn = lsh_errors(threshold, bands, rows, grid=401)
            err = fp_weight * fp + fn_weight * fn
            if best is None or err < best[0] - 1e-15:
                best = (err, bands, rows)
    assert best is not None
    return best[1], best[2]


def band_hashes(signatures: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """(n, bands) uint64: a hash of each band's `rows` consecutive signature values (band index mixed in)."""
    if bands * rows > signatures.shape[1]:
        raise ValueError(f"{bands} bands x {rows} rows need {bands * rows} permutations, "
                         f"signatures have {signatures.shape[1]}")
    n = signatures.shape[0]
    out = np.empty((n, bands), dtype=np.uint64)
    sig = signatures.astype(np.uint64)
    for j in range(bands):
        h = np.full(n, j + 1, dtype=np.uint64) * _MIX1
        for i in range(rows):
            h = _mix64(h ^ sig[:, j * rows + i])
        out[:, j] = h
    return out
