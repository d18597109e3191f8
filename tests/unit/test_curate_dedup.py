"""Line and fuzzy (MinHash-LSH) dedup: the math, the clustering and quality on planted near-duplicates."""

from __future__ import annotations

import math
import pickle
import random
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loraforge.data.dedup import (
    ALL_LINES_DUPLICATE,
    MAX_BUCKET_ALL_PAIRS,
    NEAR_DUPLICATE,
    UnionFind,
    band_keys,
    first_line_owners,
    fuzzy_clusters,
    fuzzy_lsh_params,
    line_hashes,
    mark_fuzzy_duplicates,
    remove_seen_lines,
)
from loraforge.data.minhash import (
    estimated_jaccard,
    jaccard,
    lsh_errors,
    lsh_params,
    minhash_signatures,
    normalise_text,
    normalised_words,
    s_curve,
    shingle_set,
    text_shingles,
)
from loraforge.data.schema import DROPPED, KEPT, KIND_TEXT, MERGED, OP_FUZZY_DEDUP, OP_LINE_DEDUP
from loraforge.spec import DedupSpec

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from curate_rows import make_rows  # noqa: E402
from planted_corpus import dedup_corpus, pair_scores, similar_pairs  # noqa: E402

SPEC = DedupSpec()  # threshold 0.8, 5-grams, 128 permutations, keep heuristic_score


def rows_of(texts: list[str], source: str = "s", **extra) -> pa.Table:
    out = []
    for i, t in enumerate(texts):
        row = {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": t}]}
        row.update({k: v[i] for k, v in extra.items()})
        out.append(row)
    return make_rows(out, source=source)


def words(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [f"w{rng.randrange(100_000)}" for _ in range(n)]


def dedup(table: pa.Table, spec: DedupSpec = SPEC) -> tuple[pa.Table, object]:
    decision = fuzzy_clusters(band_keys(table, spec), spec)
    return mark_fuzzy_duplicates(table, decision), decision


def status_of(table: pa.Table) -> dict[str, tuple[str, str | None]]:
    return {r["id"]: (r["status"], r["merged_into"]) for r in table.select(["id", "status", "merged_into"]).to_pylist()}


# ================================================================ text, shingles, signatures
def test_normalised_words_match_the_python_reference():
    texts = ["Hello,  World!\tIt's  FINE.", "  ", "", "Café — naïve ﬁne; 12,345 $5", "a\nb\r\nc", "don't-stop"]
    got = normalised_words(pa.array(texts)).to_pylist()
    assert got == [normalise_text(t) for t in texts]
    assert got[0] == ["hello", "world", "it", "s", "fine"]
    assert got[1] == [] and got[2] == []
    assert normalised_words(pa.array(["7 + 12 = 19"]), mask_digits=True).to_pylist() == [["0", "0", "0"]]


@settings(max_examples=80, deadline=None)
@given(st.lists(st.text(alphabet="abcdeé É—’ ,.!\n\t", max_size=60), min_size=1, max_size=6), st.integers(1, 6))
def test_shingle_hashes_count_exactly_the_distinct_ngrams(texts, n):
    """No hash collisions and the same n-grams as the reference: distinct hashes == distinct n-grams,
    and two texts share exactly as many hashes as reference n-grams."""
    sh = text_shingles(pa.array(texts), n)
    sets = [set(sh.row(i).tolist()) for i in range(len(texts))]
    refs = [shingle_set(t, n) for t in texts]
    assert [len(s) for s in sets] == [len(r) for r in refs]
    for a in range(len(texts)):
        for b in range(a + 1, len(texts)):
            assert len(sets[a] & sets[b]) == len(refs[a] & refs[b])


def test_rows_shorter_than_n_get_one_shingle_of_all_their_words():
    sh = text_shingles(pa.array(["one two", "one two", "two one", "", "a b c d e f"]), 5)
    assert sh.lengths.tolist() == [1, 1, 1, 0, 2]
    assert sh.row(0)[0] == sh.row(1)[0] != sh.row(2)[0]
    assert len(text_shingles(pa.array(["one two"]), 5, short="none").values) == 0


def _pair_with_jaccard(target: float, size: int, rng: random.Random) -> tuple[set[int], set[int], float]:
    """Two integer sets of `size` elements each with Jaccard as close to target as integers allow."""
    shared = round(2 * size * target / (1 + target))
    a = rng.sample(range(10**9), 2 * size - shared)
    return set(a[:size]), set(a[:shared] + a[size:]), shared / (2 * size - shared)


def _signatures(sets: list[set[int]], num_perm: int) -> np.ndarray:
    """Signatures of integer sets through the real code path (each integer becomes one word)."""
    texts = pa.array([" ".join(f"x{v}" for v in s) for s in sets])
    return minhash_signatures(text_shingles(texts, 1), num_perm)


def test_signature_estimate_is_unbiased_with_binomial_spread():
    rng = random.Random(7)
    pairs = [_pair_with_jaccard(0.6, 150, rng) for _ in range(300)]
    j = pairs[0][2]
    sig = _signatures([s for a, b, _ in pairs for s in (a, b)], 128)
    est = estimated_jaccard(sig[0::2], sig[1::2])
    sd = math.sqrt(j * (1 - j) / 128)
    assert abs(est.mean() - j) < 4 * sd / math.sqrt(len(pairs))  # unbiased
    assert 0.75 * sd < est.std() < 1.25 * sd  # and each estimate is Binomial(128, J) / 128


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sets(st.integers(0, 400), min_size=1, max_size=120), st.sets(st.integers(0, 400), min_size=1, max_size=120))
def test_signature_estimate_stays_within_a_binomial_bound(a, b):
    j = len(a & b) / len(a | b)
    sig = _signatures([a, b], 256)
    bound = 5 * math.sqrt(max(j * (1 - j), 1e-9) / 256) + 1 / 256
    assert abs(float(estimated_jaccard(sig[0], sig[1])) - j) <= bound


def test_empty_rows_get_the_empty_signature_and_identical_rows_identical_ones():
    sig = minhash_signatures(text_shingles(pa.array(["a b c d e f", "", "a b c d e f"]), 5), 64)
    assert (sig[1] == 0xFFFFFFFF).all()
    assert (sig[0] == sig[2]).all() and (sig[0] < 2**31).all()


# ================================================================ LSH parameters
def test_lsh_params_minimise_the_weighted_error_integrals():
    """Against an independent brute force with scipy's adaptive quadrature of the S-curve."""
    from scipy.integrate import quad

    t, perms = 0.8, 64

    def err(b: int, r: int, wfp: float, wfn: float) -> float:
        p = lambda s: 1 - (1 - s**r) ** b  # noqa: E731
        return wfp * quad(p, 0, t)[0] + wfn * quad(lambda s: 1 - p(s), t, 1)[0]

    for wfp, wfn in ((0.5, 0.5), (0.1, 0.9)):
        best = min((err(b, r, wfp, wfn), b, r) for b in range(1, perms + 1) for r in range(1, perms // b + 1))
        chosen = lsh_params(t, perms, wfp, wfn)
        assert err(*chosen, wfp, wfn) <= best[0] * 1.001, (chosen, best)


@pytest.mark.parametrize("threshold", [0.5, 0.7, 0.8, 0.9])
def test_equal_weight_s_curve_crosses_one_half_near_the_threshold(threshold):
    b, r = lsh_params(threshold, 128)
    assert b * r <= 128
    midpoint = (1 - 0.5 ** (1 / b)) ** (1 / r)  # s where 1 - (1 - s^r)^b = 1/2
    assert abs(midpoint - threshold) < 0.05
    assert s_curve(threshold - 0.2, b, r) < 0.1 and s_curve(min(threshold + 0.15, 1.0), b, r) > 0.85
    # and it beats naive choices on the weighted error it minimises
    chosen = sum(lsh_errors(threshold, b, r))
    for naive in [(128, 1), (1, 128), (16, 8), (8, 16), (32, 4)]:
        assert chosen <= sum(lsh_errors(threshold, *naive)) + 1e-12


def test_fuzzy_dedup_bands_favour_recall_since_candidates_are_verified():
    b, r = fuzzy_lsh_params(SPEC)
    assert (b, r) != lsh_params(0.8, 128)
    assert s_curve(0.8, b, r) > 0.97 and s_curve(0.85, b, r) > 0.99  # few true pairs lost to banding
    assert s_curve(0.3, b, r) < 0.01  # and unrelated pairs still rarely become candidates


def test_band_collision_rate_matches_the_s_curve():
    """Through the real signature + band hash code: P(pair shares a band) = 1 - (1 - s^r)^b."""
    rng = random.Random(3)
    b, r = fuzzy_lsh_params(SPEC)
    for target in (0.6, 0.8):
        pairs = [_pair_with_jaccard(target, 120, rng) for _ in range(400)]
        s = pairs[0][2]
        from loraforge.data.minhash import band_hashes

        bh = band_hashes(_signatures([x for a, c, _ in pairs for x in (a, c)], 128), b, r)
        rate = float(np.mean((bh[0::2] == bh[1::2]).any(axis=1)))
        p = float(s_curve(s, b, r))
        assert abs(rate - p) < 4 * math.sqrt(p * (1 - p) / 400) + 0.01, (s, rate, p)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.sets(st.integers(0, 60), max_size=40), min_size=2, max_size=8))
def test_exact_jaccards_equal_python_set_jaccard(sets):
    from loraforge.data.dedup import exact_jaccards
    from loraforge.data.minhash import Ragged

    values = np.concatenate([np.array(sorted(x), dtype=np.uint64) for x in sets])
    offsets = np.concatenate([[0], np.cumsum([len(x) for x in sets])]).astype(np.int64)
    lo, hi = np.triu_indices(len(sets), 1)
    got = exact_jaccards(Ragged(values, offsets), lo, hi, chunk_values=7)  # tiny chunks: many passes
    assert got.tolist() == pytest.approx([jaccard(sets[a], sets[b]) for a, b in zip(lo, hi, strict=True)])


def test_rows_above_the_shingle_cap_are_verified_by_estimate(monkeypatch):
    import loraforge.data.dedup as dedup_mod

    base = words(300, 12)
    near = list(base)
    near[150] = "edited"
    table = rows_of([" ".join(base), " ".join(near), " ".join(words(20, 13)), " ".join(words(20, 13))])
    monkeypatch.setattr(dedup_mod, "MAX_EXACT_SHINGLES", 100)
    keys = band_keys(table, SPEC)
    assert keys.column("shingles").null_count == 2  # the two long rows carry no set
    out, decision = dedup(table)
    assert decision.estimated >= 1 and decision.merged["s:2"][3] is False
    assert decision.merged["s:4"] == ("s:3", 1.0, 2, True)
    assert "estimated Jaccard" in out.to_pylist()[1]["detail"]


# ================================================================ union-find
def test_union_find_joins_compresses_and_ranks():
    uf = UnionFind(6)
    assert uf.union(0, 1) and uf.union(2, 3) and uf.union(1, 3)
    assert not uf.union(0, 2)  # already one set
    root = uf.find(0)
    assert {uf.find(i) for i in range(4)} == {root} and uf.find(4) != root
    assert uf.rank[root] == 2  # two rank-1 trees joined
    uf.find(3)
    assert uf.parent[3] == root  # path compressed


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 40).flatmap(lambda n: st.tuples(st.just(n), st.lists(st.tuples(st.integers(0, n - 1),
                                                                                      st.integers(0, n - 1))))))
def test_union_find_components_equal_graph_components(case):
    n, edges = case
    uf = UnionFind(n)
    for a, b in edges:
        uf.union(a, b)
    adjacency: dict[int, set[int]] = {i: set() for i in range(n)}
    for a, b in edges:
        adjacency[a].add(b)
        adjacency[b].add(a)
    for start in range(n):  # breadth-first component of `start` == union-find set
        seen, todo = {start}, [start]
        while todo:
            for nxt in adjacency[todo.pop()] - seen:
                seen.add(nxt)
                todo.append(nxt)
        assert {i for i in range(n) if uf.find(i) == uf.find(start)} == seen


# ================================================================ clustering
def test_best_member_by_keep_column_is_kept_not_the_first():
    base = words(200, 1)
    texts = [" ".join(base), " ".join(base[:100] + ["edit"] + base[101:]), " ".join(base[:150] + base[151:])]
    out, decision = dedup(rows_of(texts, heuristic_score=[0.2, 0.9, 0.5]))
    st_ = status_of(out)
    assert st_["s:2"] == (KEPT, None)
    assert st_["s:1"] == (MERGED, "s:2") and st_["s:3"] == (MERGED, "s:2")
    row = out.to_pylist()[0]
    assert (row["op"], row["reason"]) == (OP_FUZZY_DEDUP, NEAR_DUPLICATE)
    assert "Jaccard 0.9" in row["detail"] and "heuristic_score" in row["detail"]
    assert decision.clusters == 1 and len(decision.merged) == 2


def test_keep_ties_and_nulls_fall_back_to_input_order_and_other_columns_work():
    text = " ".join(words(50, 2))
    out, _ = dedup(rows_of([text, text, text], heuristic_score=[None, 0.5, 0.5]))
    assert status_of(out)["s:2"] == (KEPT, None)  # tie at 0.5: the earlier; null ranks lowest
    spec = DedupSpec(keep="quality")
    out, _ = dedup(rows_of([text, text], quality=[0.1, 0.3]), spec)
    assert status_of(out)["s:1"] == (MERGED, "s:2")
    with pytest.raises(ValueError, match="'nope'"):
        band_keys(rows_of([text]), DedupSpec(keep="nope"))
    with pytest.raises(ValueError, match="numeric"):
        band_keys(rows_of([text]), DedupSpec(keep="source"))


def test_clusters_are_transitive_across_sources_and_batches():
    """A~B and B~C but A !~ C: one cluster of three, collected from two sources in separate batches."""
    a = words(300, 3)
    b, c = list(a), list(a)
    for k, pos in enumerate((20, 50, 80, 110)):  # b: four substitutions in the first half
        b[pos] = c[pos] = f"first{k}"
    for k, pos in enumerate((170, 200, 230, 260)):  # c: b plus four in the second half
        c[pos] = f"second{k}"
    ja, jb, jc = (shingle_set(" ".join(x), 5) for x in (a, b, c))
    assert jaccard(ja, jb) >= 0.85 and jaccard(jb, jc) >= 0.85 and jaccard(ja, jc) < 0.8
    first = rows_of([" ".join(a), " ".join(words(300, 4))], source="first", heuristic_score=[0.5, 0.5])
    second = make_rows(
        [{"user": "Q", "answer": " ".join(b), "input_index": 1, "heuristic_score": 0.1},
         {"user": "Q", "answer": " ".join(c), "input_index": 1, "heuristic_score": 0.9}],
        source="second",
    )
    keys = pa.concat_tables([band_keys(second, SPEC), band_keys(first, SPEC)])  # collected per batch
    decision = fuzzy_clusters(keys, SPEC)
    out = pa.concat_tables([mark_fuzzy_duplicates(t, decision) for t in (first, second)])
    st_ = status_of(out)
    assert st_["second:2"] == (KEPT, None)  # the best score wins across sources
    assert st_["first:1"] == (MERGED, "second:2") and st_["second:1"] == (MERGED, "second:2")
    assert st_["first:2"] == (KEPT, None)
    assert decision.merged["first:1"][2] == 3  # cluster size


def test_identical_texts_in_a_huge_bucket_collapse_into_one_row_with_bounded_pairs():
    text = " ".join(words(30, 5))
    n = 5 * MAX_BUCKET_ALL_PAIRS
    out, decision = dedup(rows_of([text] * n))
    assert [s for s, _ in status_of(out).values()].count(KEPT) == 1
    bands = fuzzy_lsh_params(SPEC)[0]
    assert decision.candidates <= 2 * n  # star + chain, not n(n-1)/2 pairs per band
    assert decision.candidates < bands * n * (n - 1) / 2


@settings(max_examples=25, deadline=None)
@given(st.text(alphabet="abcdefgh XYZ.,", min_size=1, max_size=200).filter(lambda t: normalise_text(t)))
def test_identical_text_always_clusters(text):
    out, _ = dedup(rows_of([text, "unrelated filler words " * 5, text], heuristic_score=[0.1, 0.5, 0.2]))
    st_ = status_of(out)
    assert st_["s:1"] == (MERGED, "s:3") and st_["s:3"] == (KEPT, None) and st_["s:2"][0] == KEPT


def test_only_kept_rows_take_part_and_wordless_rows_are_not_collected():
    text = " ".join(words(40, 6))
    table = make_rows([{"messages": [{"role": "assistant", "content": t}], "status": s}
                       for t, s in [(text, DROPPED), (text, KEPT), ("!!! ...", KEPT), ("", KEPT)]])
    keys = band_keys(table, SPEC)
    assert keys.column("id").to_pylist() == ["s:2"]
    out = mark_fuzzy_duplicates(table, fuzzy_clusters(keys, SPEC))
    assert out.column("status").to_pylist() == [DROPPED, KEPT, KEPT, KEPT]


def test_resolve_rejects_keys_built_with_another_spec_and_decision_pickles():
    table = rows_of([" ".join(words(40, 8))] * 2)
    keys = band_keys(table, SPEC)
    with pytest.raises(ValueError, match="same DedupSpec"):
        fuzzy_clusters(keys, DedupSpec(num_perm=64))
    decision = pickle.loads(pickle.dumps(fuzzy_clusters(keys, SPEC)))
    assert decision.merged == {"s:2": ("s:1", 1.0, 2, True)}
    assert fuzzy_clusters(keys.slice(0, 0), SPEC).merged == {}


# ================================================================ quality on planted near-duplicates
def _datasketch_pairs(texts: list[str], threshold: float, num_perm: int, n: int) -> set[tuple[int, int]]:
    from datasketch import MinHash, MinHashLSH

    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    hashes = []
    for i, t in enumerate(texts):
        m = MinHash(num_perm=num_perm)
        m.update_batch([" ".join(g).encode("utf-8") for g in shingle_set(t, n)])
        hashes.append(m)
        lsh.insert(i, m)
    return {(min(i, j), max(i, j)) for i, m in enumerate(hashes) for j in lsh.query(m) if j != i}


def test_planted_near_duplicates_recall_and_precision_vs_datasketch(record_property):
    docs = dedup_corpus(seed=0)
    texts = [d.text for d in docs]
    truth = set(similar_pairs(texts, SPEC.threshold, SPEC.ngram))
    near = [j for j in similar_pairs(texts, 0.3, SPEC.ngram).values() if 0.7 <= j < 0.9]
    assert len(truth) > 200 and len(near) > 50  # plenty of true pairs, and pairs near the threshold
    assert all(docs[a].family == docs[b].family for a, b in truth)  # no accidental pairs in the real data
    sources = sorted({d.source for d in docs})
    tables = [  # one input dataset per source, collected batch by batch
        make_rows([{"messages": [{"role": "assistant", "content": d.text}], "kind": KIND_TEXT,
                    "id": f"{s}:{i + 1}", "line": i + 1, "input_index": k}
                   for i, d in enumerate(docs) if d.source == s], source=s)
        for k, s in enumerate(sources)
    ]
    decision = fuzzy_clusters(pa.concat_tables([band_keys(t, SPEC) for t in tables]), SPEC)
    position = {f"{d.source}:{i + 1}": i for i, d in enumerate(docs)}
    ours = {(min(position[a], position[b]), max(position[a], position[b])) for a, b, _ in decision.pairs}
    recall, precision = pair_scores(ours, truth)
    ds_recall, ds_precision = pair_scores(_datasketch_pairs(texts, SPEC.threshold, SPEC.num_perm, SPEC.ngram), truth)
    report = {"pairs": len(truth), "ours": (round(recall, 3), round(precision, 3)),
              "datasketch": (round(ds_recall, 3), round(ds_precision, 3))}
    print("planted near-duplicates (recall, precision):", report)
    record_property("dedup_quality", report)
    assert recall >= 0.95 and precision >= 0.95, report
    # Every merge points at a kept row of the same family (cluster level, after union-find).
    kept = {i for i in range(len(docs))} - {position[r] for r in decision.merged}
    for row, (into, *_rest) in decision.merged.items():
        assert position[into] in kept and docs[position[into]].family == docs[position[row]].family


# ================================================================ line dedup
def line_rows(answers: list[str], **extra) -> pa.Table:
    return rows_of(answers, **extra)


def run_line_dedup(table: pa.Table, min_chars: int = 10) -> pa.Table:
    return remove_seen_lines(table, first_line_owners(line_hashes(table, min_chars)), min_chars)


def test_later_copies_of_a_line_are_cut_and_counted():
    a = "The quick brown fox jumps.\nshort\nA line seen only here, long enough."
    b = "Some fresh opening line here.\n  THE QUICK   brown fox jumps.  \nshort"
    out = run_line_dedup(line_rows([a, b]))
    rows = out.to_pylist()
    assert rows[0]["messages"][1]["content"] == a and rows[0]["lines_removed"] == 0
    assert rows[1]["messages"][1]["content"] == "Some fresh opening line here.\nshort"  # short line stays
    assert rows[1]["lines_removed"] == 1 and rows[1]["status"] == KEPT
    assert rows[1]["text_chars"] == len("Q") + len("Some fresh opening line here.\nshort")


def test_a_row_left_without_response_is_dropped_with_the_owner_named():
    shared = "This whole answer was already written.\nAnd so was this second line."
    out = run_line_dedup(line_rows(["Unique first line of row one.\n" + shared, shared]))
    row = out.to_pylist()[1]
    assert (row["status"], row["op"], row["reason"]) == (DROPPED, OP_LINE_DEDUP, ALL_LINES_DUPLICATE)
    assert "s:1" in row["detail"] and row["lines_removed"] == 2


def test_lines_under_min_chars_and_own_repeats_are_never_cut():
    text = "Repeated refrain of the song.\nRepeated refrain of the song.\nok"
    out = run_line_dedup(line_rows([text, "ok\nok"]), min_chars=10)
    rows = out.to_pylist()
    assert rows[0]["messages"][1]["content"] == text  # a row keeps every copy of lines it owns
    assert rows[1]["messages"][1]["content"] == "ok\nok" and rows[1]["status"] == KEPT
    assert len(line_hashes(line_rows([text]), 10)) == 2 and len(line_hashes(line_rows([text]), 100)) == 0


def test_line_owner_is_first_in_input_order_across_sources_and_batches():
    line = "An identical line shared by two datasets."
    later = make_rows([{"user": "Q", "answer": line + "\nextra words here to keep", "input_index": 1}], source="b")
    earlier = make_rows([{"user": "Q", "answer": "start\n" + line, "input_index": 0, "line": 9}], source="a")
    owners = first_line_owners(pa.concat_tables([line_hashes(later, 10), line_hashes(earlier, 10)]))
    assert owners.owner_id == ["a:1"] or "a:1" in owners.owner_id
    assert remove_seen_lines(earlier, owners, 10).to_pylist()[0]["lines_removed"] == 0
    cut = remove_seen_lines(later, owners, 10).to_pylist()[0]
    assert cut["messages"][1]["content"] == "extra words here to keep" and cut["lines_removed"] == 1


def test_only_assistant_text_of_kept_rows_is_touched():
    line = "A long line that appears in a user prompt."
    table = make_rows([
        {"messages": [{"role": "user", "content": line}, {"role": "assistant", "content": line + "\nmore text here"}]},
        {"user": line, "answer": "A fully different answer line."},
        {"user": "Q", "answer": line, "status": DROPPED},
        {"messages": [{"role": "assistant", "content": "doc line one is long\n" + line}], "kind": KIND_TEXT},
    ])
    out = run_line_dedup(table).to_pylist()
    assert out[1]["messages"] == table.to_pylist()[1]["messages"]  # prompts are never cut
    assert out[2]["status"] == DROPPED and out[2]["messages"][1]["content"] == line
    assert out[3]["messages"][0]["content"] == "doc line one is long" and out[3]["lines_removed"] == 1


def test_rows_merged_earlier_into_a_fuzzy_duplicate_follow_it_to_the_kept_row():
    base = words(200, 9)
    near = list(base)
    near[100] = "edited"
    table = rows_of([" ".join(base), " ".join(near), " ".join(near)], heuristic_score=[0.9, 0.1, 0.1],
                    status=[KEPT, KEPT, MERGED], op=[None, None, "exact_dedup"], reason=[None, None, "duplicate"],
                    merged_into=[None, None, "s:2"])
    out, _ = dedup(table)
    rows = {r["id"]: r for r in out.to_pylist()}
    assert (rows["s:2"]["status"], rows["s:2"]["merged_into"]) == (MERGED, "s:1")
    assert (rows["s:3"]["status"], rows["s:3"]["op"], rows["s:3"]["merged_into"]) == (MERGED, "exact_dedup", "s:1")
    assert "s:2 merged into s:1" in rows["s:3"]["detail"]
