"""Contamination: lightly edited GSM8K test questions planted among real clean rows are all caught."""

from __future__ import annotations

import json
import pickle
import random
import re
import sys
from pathlib import Path

import pyarrow as pa
import pytest

from loraforge.data.contamination import (
    FUZZY_MATCH,
    NGRAM_OVERLAP,
    build_contamination_index,
    load_eval_items,
    mark_contaminated,
)
from loraforge.data.minhash import jaccard, normalise_text, shingle_set
from loraforge.data.schema import DROPPED, KEPT, KIND_TEXT, OP_CONTAMINATION
from loraforge.errors import DataError
from loraforge.paths import shared_data_dir
from loraforge.spec import ContaminationSpec

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from curate_rows import make_rows  # noqa: E402
from planted_corpus import self_instruct_pairs, shakespeare_passages  # noqa: E402

GSM8K = shared_data_dir() / "gsm8k_test.jsonl"
SPEC = ContaminationSpec(eval_sets=[str(GSM8K)])
SYNONYMS = {
    "buys": "purchases", "bought": "purchased", "has": "owns", "each": "every", "total": "overall",
    "money": "cash", "makes": "earns", "store": "shop", "friends": "pals", "house": "home",
    "cost": "price", "costs": "is priced at", "many": "numerous", "gets": "receives", "wants": "would like",
}


@pytest.fixture(scope="module")
def index():
    return build_contamination_index(load_eval_items([GSM8K]), SPEC)


@pytest.fixture(scope="module")
def questions() -> list[str]:
    return [json.loads(line)["question"] for line in GSM8K.read_text(encoding="utf-8").splitlines()]


# ---------------------------------------------------------------- light edits
def change_number(q: str, rng: random.Random) -> str:
    return re.sub(r"\d+", lambda m: str(int(m.group()) + rng.randint(1, 9)), q, count=1)


def synonym(q: str, rng: random.Random) -> str:
    words = q.split()
    spots = [i for i, w in enumerate(words) if w.lower().strip(",.?") in SYNONYMS]
    i = rng.choice(spots) if spots else rng.randrange(len(words))
    words[i] = SYNONYMS.get(words[i].lower().strip(",.?"), "thing")
    return " ".join(words)


def drop_word(q: str, rng: random.Random) -> str:
    words = q.split()
    del words[rng.randrange(len(words))]
    return " ".join(words)


def recase(q: str, rng: random.Random) -> str:
    return re.sub(r"[.,?]", "", q).upper() + " ??"


def prefix(q: str, rng: random.Random) -> str:
    return "Solve: " + q


def combined(q: str, rng: random.Random) -> str:
    return prefix(recase(synonym(change_number(q, rng), rng), rng), rng)


def paraphrase(q: str, rng: random.Random) -> str:
    """An edit every 12 words: no 13-gram survives, a 3-gram Jaccard of ~0.6 does."""
    words = normalise_text(q)  # count words as the check does ("$500/month" is two)
    for i in range(6, len(words), 12):
        words[i] = SYNONYMS.get(words[i].lower(), words[i] + "s")
    return " ".join(words)


EDITS = [change_number, synonym, drop_word, recase, prefix, combined]


def clean_rows() -> list[dict]:
    rows = [{"user": u, "answer": a} for u, a in self_instruct_pairs()]
    docs = shakespeare_passages()[:600]
    rows += [{"messages": [{"role": "assistant", "content": p}], "kind": KIND_TEXT} for p in docs]
    return rows


def planted_rows(questions: list[str], n: int, seed: int) -> tuple[list[dict], dict[int, str]]:
    """n planted rows (question in the user turn) and row -> expected eval item id."""
    rng = random.Random(seed)
    picks = rng.sample(range(len(questions)), n)
    rows, expected = [], {}
    for k, qi in enumerate(picks):
        edited = EDITS[k % len(EDITS)](questions[qi], rng)
        rows.append({"user": edited, "answer": f"Let's think step by step. The answer is {rng.randint(2, 99)}."})
        expected[k] = f"gsm8k_test:{qi + 1}"
    return rows, expected


# ---------------------------------------------------------------- the planted test
def test_every_planted_question_is_caught_and_no_clean_row_is_flagged(index, questions):
    planted, expected = planted_rows(questions, 150, seed=11)
    clean = clean_rows()
    rng = random.Random(5)
    order = list(range(len(planted) + len(clean)))
    rng.shuffle(order)
    rows = [(planted + clean)[i] for i in order]
    out = mark_contaminated(make_rows(rows), index, SPEC).to_pylist()
    flagged = {order[pos]: r for pos, r in enumerate(out) if r["status"] == DROPPED}
    missed = [planted[k]["user"] for k in expected if k not in flagged]
    assert not missed, f"{len(missed)} planted rows not caught, e.g. {missed[:2]}"
    false = [r["detail"] for i, r in flagged.items() if i >= len(planted)]
    assert not false, f"{len(false)} clean rows flagged, e.g. {false[:2]}"
    for k, item in expected.items():
        r = flagged[k]
        assert r["op"] == OP_CONTAMINATION and r["reason"] in (NGRAM_OVERLAP, FUZZY_MATCH)
        assert f"eval item {item}:" in r["detail"], (item, r["detail"])
    assert len(clean) > 1000


def test_paraphrased_questions_are_caught_by_the_fuzzy_match(index, questions):
    rng = random.Random(2)
    picks = [i for i in rng.sample(range(len(questions)), 40) if len(questions[i].split()) >= 20][:20]
    texts = [paraphrase(questions[i], rng) for i in picks]
    for t, i in zip(texts, picks, strict=True):  # the edit really leaves no 13-gram and a high 3-gram Jaccard
        assert not shingle_set(t, 13, "none", True) & shingle_set(questions[i], 13, "none", True)
        assert jaccard(shingle_set(t, 3, "none", True), shingle_set(questions[i], 3, "none", True)) >= 0.5
    out = mark_contaminated(make_rows([{"user": t, "answer": "42"} for t in texts]), index, SPEC).to_pylist()
    for r, i in zip(out, picks, strict=True):
        assert (r["status"], r["reason"]) == (DROPPED, FUZZY_MATCH), r
        assert f"gsm8k_test:{i + 1}" in r["detail"] and "Jaccard" in r["detail"]


def test_exact_overlap_detail_names_the_shared_ngram(index, questions):
    passage = shakespeare_passages()[0]
    text = passage + "\n" + questions[0] + "\n" + passage  # a question buried in a long document
    out = mark_contaminated(make_rows([{"messages": [{"role": "assistant", "content": text}]}]), index, SPEC)
    row = out.to_pylist()[0]
    assert (row["status"], row["reason"]) == (DROPPED, NGRAM_OVERLAP)
    assert 'shares the 13-gram "' in row["detail"] and "gsm8k_test:1" in row["detail"]
    assert "janet s ducks lay 0 eggs" in row["detail"]  # digits are masked in the compared words


def test_field_prompt_compares_only_user_turns(questions):
    spec = ContaminationSpec(eval_sets=[str(GSM8K)], field="prompt")
    idx = build_contamination_index(load_eval_items([GSM8K]), spec)
    table = make_rows([{"user": "Tell me a story.", "answer": questions[3]}, {"user": questions[4], "answer": "ok"}])
    assert mark_contaminated(table, idx, spec).column("status").to_pylist() == [KEPT, DROPPED]
    spec_all = ContaminationSpec(eval_sets=[str(GSM8K)], field="all")
    assert mark_contaminated(table, idx, spec_all).column("status").to_pylist() == [DROPPED, DROPPED]


def test_rejected_answers_count_as_training_text(index, questions):
    table = make_rows([{"user": "Pick one.", "answer": "A fine answer here.", "rejected": questions[7]}])
    assert mark_contaminated(table, index, SPEC).column("status").to_pylist() == [DROPPED]


def test_only_kept_rows_are_checked_and_short_texts_do_not_match_fuzzily(index, questions):
    table = make_rows([
        {"user": questions[0], "answer": "x", "status": DROPPED, "op": "filter", "reason": "too_short"},
        {"user": "How many?", "answer": "Yes."},  # short texts are left out of the fuzzy test
    ])
    out = mark_contaminated(table, index, SPEC).to_pylist()
    assert [(r["status"], r["op"]) for r in out] == [(DROPPED, "filter"), (KEPT, None)]


# ---------------------------------------------------------------- eval sets and the index
def test_eval_items_from_curate_formats_and_their_ids(tmp_path):
    path = tmp_path / "mini_eval.jsonl"
    path.write_text(
        json.dumps({"instruction": "Name the largest planet of the solar system and explain why it is so big.",
                    "output": "Jupiter."}) + "\n\n"
        + json.dumps({"messages": [{"role": "user", "content": "What is the boiling point of water at sea level "
                                    "in degrees Celsius and in Fahrenheit?"},
                                   {"role": "assistant", "content": "100 C, 212 F."}]}) + "\n"
    )
    items = load_eval_items([path])
    assert [i.id for i in items] == ["mini_eval:1", "mini_eval:3"]
    spec = ContaminationSpec(eval_sets=[str(path)])
    idx = build_contamination_index(items, spec)
    row = make_rows([{"user": "what is the boiling point of water at sea level in degrees celsius and in "
                              "fahrenheit", "answer": "hot"}])
    out = mark_contaminated(row, idx, spec).to_pylist()[0]
    assert out["status"] == DROPPED and "mini_eval:3" in out["detail"]


@pytest.mark.parametrize(
    ("content", "match"),
    [("{not json\n", r"bad\.jsonl:1: not a JSON line"), ('{"foo": 1}\n', r"bad\.jsonl:1: not a GSM8K row"),
     ('{"question": 3, "answer": "x"}\n', "must be strings"), ("\n", "no eval items")],
)
def test_bad_eval_files_raise_naming_file_and_line(tmp_path, content, match):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match=match):
        load_eval_items([path])


def test_missing_eval_file_raises():
    with pytest.raises(DataError, match="not found"):
        load_eval_items(["/nonexistent/eval.jsonl"])


def test_index_pickles_and_refuses_a_different_spec(index):
    again = pickle.loads(pickle.dumps(index))
    assert len(again) == 1319 and (again.gram_hashes == index.gram_hashes).all()
    table = make_rows([{"user": "hello there", "answer": "hi"}])
    with pytest.raises(ValueError, match="rebuild the index"):
        mark_contaminated(table, index, ContaminationSpec(ngram=8))
    assert mark_contaminated(table.slice(0, 0), index, SPEC).num_rows == 0
    assert isinstance(mark_contaminated(table, index, SPEC), pa.Table)
