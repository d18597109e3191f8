"""Corpora with planted near-duplicates and known ground truth, built from the real shared data.

Used by tests/unit/test_curate_dedup.py (a ~1k-document corpus) and benchmarks/curate_throughput.py
(100k+ rows). Near-duplicates are made by word edits (substitute / delete / insert a word) applied
one at a time until the word 5-gram Jaccard with the source reaches a target level; the truth is
always the exact Jaccard of the final texts, never the target.
"""

from __future__ import annotations

import json
import random
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from loraforge.data.formats import parse_record
from loraforge.data.minhash import jaccard, normalise_text, shingle_set
from loraforge.paths import shared_data_dir

SELF_INSTRUCT_FILES = ("self_instruct_seed_tasks.jsonl", "self_instruct_user_oriented.jsonl")


# ---------------------------------------------------------------- real text
def self_instruct_pairs(data_dir: Path | None = None) -> list[tuple[str, str]]:
    """(user, answer) of every usable self_instruct instance, in file order."""
    data_dir = data_dir or shared_data_dir()
    out = []
    for name in SELF_INSTRUCT_FILES:
        for line in (data_dir / name).read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            for _sub, parsed in parse_record(json.loads(line), "self_instruct"):
                messages = getattr(parsed, "messages", None)
                if messages and messages[-1]["content"].strip():
                    out.append((messages[0]["content"], messages[-1]["content"]))
    return out


def self_instruct_documents(data_dir: Path | None = None, min_words: int = 100) -> list[str]:
    """Each self_instruct task as one document (instruction, then every instance's input and output)."""
    data_dir = data_dir or shared_data_dir()
    out = []
    for name in SELF_INSTRUCT_FILES:
        for line in (data_dir / name).read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            task = json.loads(line)
            parts = [task["instruction"]]
            for inst in task["instances"]:
                parts += [p for p in (inst.get("input") or "", inst.get("output") or "") if p.strip()]
            text = "\n".join(parts)
            if len(text.split()) >= min_words:
                out.append(text)
    return out


def self_instruct_instructions(data_dir: Path | None = None) -> list[str]:
    data_dir = data_dir or shared_data_dir()
    out = []
    for name in SELF_INSTRUCT_FILES:
        for line in (data_dir / name).read_text(encoding="utf-8").splitlines():
            if line.strip():
                out.append(json.loads(line)["instruction"])
    return out


def shakespeare_lines(data_dir: Path | None = None, min_words: int = 6) -> list[str]:
    """Distinct lines of tinyshakespeare with at least min_words words (speaker tags left out)."""
    data_dir = data_dir or shared_data_dir()
    seen, out = set(), []
    for line in (data_dir / "tinyshakespeare.txt").read_text(encoding="utf-8").splitlines():
        line = line.strip()
        key = " ".join(normalise_text(line))
        if len(line.split()) >= min_words and key not in seen:
            seen.add(key)
            out.append(line)
    return out


def shakespeare_passages(data_dir: Path | None = None, min_words: int = 80) -> list[str]:
    """Disjoint runs of consecutive lines, each of at least min_words words."""
    data_dir = data_dir or shared_data_dir()
    out, cur, count = [], [], 0
    for line in (data_dir / "tinyshakespeare.txt").read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        cur.append(line)
        count += len(line.split())
        if count >= min_words:
            out.append("\n".join(cur))
            cur, count = [], 0
    return out


# ---------------------------------------------------------------- planted edits
def edit_once(words: list[str], rng: random.Random, vocab: list[str]) -> list[str]:
    """One random word edit: substitution (60%), deletion (20%) or insertion (20%)."""
    words = list(words)
    pos = rng.randrange(len(words))
    kind = rng.random()
    if kind < 0.6:
        words[pos] = rng.choice(vocab)
    elif kind < 0.8 and len(words) > 1:
        del words[pos]
    else:
        words.insert(pos, rng.choice(vocab))
    return words


def plant_variant(text: str, target: float, rng: random.Random, vocab: list[str], n: int = 5,
                  prefix: str | None = None) -> tuple[str, float]:
    """Edit `text` word by word until its n-gram Jaccard with the source is as close to `target` as
    one more edit can get; returns (variant, exact Jaccard). Words are space-joined. With `prefix`,
    the Jaccard is that of prefix + "\n" + text (the prefix, e.g. an instruction, is never edited)."""

    def whole(body: str) -> str:
        return body if prefix is None else f"{prefix}\n{body}"

    source = shingle_set(whole(text), n)
    words = text.split()
    best: tuple[str, float] | None = None
    for _ in range(10 * len(words) + 10):
        words = edit_once(words, rng, vocab)
        candidate = " ".join(words)
        j = jaccard(source, shingle_set(whole(candidate), n))
        if j < 1 and (best is None or abs(j - target) < abs(best[1] - target)):
            best = (candidate, j)  # at least one effective edit: a variant is never the source
        if j <= target:
            break
    assert best is not None
    return best


# ---------------------------------------------------------------- ground truth
def similar_pairs(texts: list[str], threshold: float, n: int = 5,
                  groups: list[int] | None = None) -> dict[tuple[int, int], float]:
    """Exact word n-gram Jaccard >= threshold for pairs (i < j) sharing at least one shingle.

    With `groups`, only pairs inside one group are compared (for large corpora whose groups are
    known to be unrelated); otherwise every pair with a common shingle is.
    """
    sets: dict[int, set] = {}
    if groups is not None:
        members: dict[int, list[int]] = defaultdict(list)
        for i, g in enumerate(groups):
            members[g].append(i)
        multi = [m for m in members.values() if len(m) > 1]
        sets = {i: shingle_set(texts[i], n) for m in multi for i in m}
        candidates: Iterable[tuple[int, int]] = ((a, b) for m in multi for x, a in enumerate(m) for b in m[x + 1:])
    else:
        sets = dict(enumerate(shingle_set(t, n) for t in texts))
        postings: dict[tuple[str, ...], list[int]] = defaultdict(list)
        for i, shingles in sets.items():
            for g in shingles:
                postings[g].append(i)
        found = set()
        for docs in postings.values():
            if 1 < len(docs) <= 200:
                found.update((a, b) for x, a in enumerate(docs) for b in docs[x + 1:])
        candidates = found
    out = {}
    for a, b in candidates:
        j = jaccard(sets[a], sets[b])
        if j >= threshold:
            out[(min(a, b), max(a, b))] = j
    return out


def pair_scores(predicted: set[tuple[int, int]], truth: set[tuple[int, int]]) -> tuple[float, float]:
    """(recall, precision) of predicted pairs against true pairs (1.0 where a set is empty)."""
    hit = len(predicted & truth)
    recall = hit / len(truth) if truth else 1.0
    precision = hit / len(predicted) if predicted else 1.0
    return recall, precision


# ---------------------------------------------------------------- the unit-test corpus
ABOVE_LEVELS = (0.85, 0.88, 0.93, 0.96)
BELOW_LEVELS = (0.5, 0.6, 0.7, 0.75)


@dataclass
class PlantedDoc:
    text: str
    family: int  # documents of one family are edits of one source; singletons have their own
    source: str  # which input dataset it belongs to (families are spread over several)
    level: float | None = None  # target Jaccard with the family source (None: the source itself)


def dedup_corpus(seed: int = 0, families: int = 180, singles: int = 300,
                 data_dir: Path | None = None) -> list[PlantedDoc]:
    """Real documents (self_instruct tasks of >= 100 words, Shakespeare passages of >= 200 words: long
    enough for one edit to move the Jaccard by only 0.03-0.08), some of which
    get planted variants: one above and one below the 0.8 threshold, or a chain of two small edits,
    or exact / re-cased copies. Variants land in a different source than their original half the
    time, so dedup has to work across input datasets."""
    rng = random.Random(seed)
    base = self_instruct_documents(data_dir, min_words=100) + shakespeare_passages(data_dir, min_words=200)
    rng.shuffle(base)
    vocab = sorted({w for t in base for w in t.split() if w.isalpha()})
    needed = families + singles
    if len(base) < needed:
        raise ValueError(f"only {len(base)} real documents, {needed} needed")
    sources = ("alpaca_like", "chat_like", "docs")
    docs: list[PlantedDoc] = []
    for f in range(families):
        text = base[f]
        home = sources[f % 3]
        docs.append(PlantedDoc(text, f, home))

        def other() -> str:
            return sources[rng.randrange(3)]

        kind = f % 6
        if kind in (0, 1, 2):  # one above, one below the threshold
            up_level, down_level = ABOVE_LEVELS[f % 4], BELOW_LEVELS[(f // 6) % 4]
            docs.append(PlantedDoc(plant_variant(text, up_level, rng, vocab)[0], f, other(), up_level))
            docs.append(PlantedDoc(plant_variant(text, down_level, rng, vocab)[0], f, other(), down_level))
        elif kind == 3:  # a chain: source -> small edit -> small edit of the edit
            v1, _ = plant_variant(text, 0.96, rng, vocab)
            v2, _ = plant_variant(v1, 0.96, rng, vocab)
            docs.append(PlantedDoc(v1, f, other(), 0.96))
            docs.append(PlantedDoc(v2, f, other(), 0.92))
        elif kind == 4:  # below the threshold only: nothing should be merged
            level = BELOW_LEVELS[(f // 6) % 4]
            docs.append(PlantedDoc(plant_variant(text, level, rng, vocab)[0], f, other(), level))
        else:  # an exact copy and a re-cased, re-punctuated copy (Jaccard 1 after normalisation)
            docs.append(PlantedDoc(text, f, other(), 1.0))
            docs.append(PlantedDoc(text.upper().replace(".", "!").replace(",", " ;"), f, other(), 1.0))
    for k in range(singles):
        docs.append(PlantedDoc(base[families + k], families + k, sources[k % 3]))
    rng.shuffle(docs)
    return docs


# ---------------------------------------------------------------- the throughput corpus
@dataclass
class BenchRow:
    instruction: str
    output: str
    family: int  # rows of one family are the source and its planted copies/variants
    kind: str  # base | near | far | exact | recased | pii | junk

    @property
    def text(self) -> str:
        """The document both pipelines deduplicate: instruction, newline, answer."""
        return f"{self.instruction}\n{self.output}"


NEAR_LEVELS = (0.85, 0.9, 0.95)
FAR_LEVELS = (0.5, 0.6, 0.7)


def throughput_corpus(n_rows: int, seed: int = 0, family_share: float = 0.08,
                      data_dir: Path | None = None) -> list[BenchRow]:
    """n_rows alpaca-style rows from real text, in random order: a self_instruct instruction and 8-12
    random Shakespeare lines as the answer. 8% of base rows get 1-3 planted copies: near-duplicates
    (word edits of the answer to Jaccard ~0.85-0.95), far variants (~0.5-0.7, not duplicates), exact
    copies and re-cased copies. 2% of rows carry PII (e-mail, phone, IP), 2% are junk for filters."""
    rng = random.Random(seed)
    instructions = self_instruct_instructions(data_dir)
    lines = shakespeare_lines(data_dir)
    vocab = sorted({w for line in lines[:5000] for w in line.split() if w.isalpha()})
    rows: list[BenchRow] = []
    family = 0
    while len(rows) < n_rows:
        family += 1
        base = BenchRow(rng.choice(instructions), "\n".join(rng.sample(lines, rng.randint(8, 12))), family, "base")
        roll = rng.random()
        if roll < 0.02:
            k = rng.randrange(10**6)
            base.output += (f"\nWrite to jane.doe{k}@mailhost.org or call +1 415-555-{k % 10000:04d}; "
                            f"the server is 52.{k % 250}.{k % 199}.{k % 97}.")
            base.kind = "pii"
        elif roll < 0.04:
            base.output = " ".join(["buy cheap pills now"] * rng.randint(20, 40))
            base.kind = "junk"
        rows.append(base)
        if base.kind != "base" or rng.random() >= family_share:
            continue
        for _ in range(rng.randint(1, 3)):
            kind = rng.choice(["near", "near", "far", "exact", "recased"])
            if kind == "near":
                out, _ = plant_variant(base.output, rng.choice(NEAR_LEVELS), rng, vocab, prefix=base.instruction)
            elif kind == "far":
                out, _ = plant_variant(base.output, rng.choice(FAR_LEVELS), rng, vocab, prefix=base.instruction)
            elif kind == "exact":
                out = base.output
            else:
                out = base.output.upper()
            rows.append(BenchRow(base.instruction, out, family, kind))
    rows = rows[:n_rows]
    rng.shuffle(rows)
    return rows


def family_truth(rows: list[BenchRow], threshold: float, n: int = 5) -> dict[tuple[int, int], float]:
    """Exact Jaccard >= threshold between rows of one family (rows of different families are random
    line draws and far below any threshold)."""
    return similar_pairs([r.text for r in rows], threshold, n, groups=[r.family for r in rows])
