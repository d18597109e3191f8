"""MoDS: quality threshold, k-center coverage (checked against its math), necessity, and the marking."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pyarrow as pa
import pytest
from curate_rows import make_rows
from hypothesis import given, settings
from hypothesis import strategies as st

from loraforge.data.kcenter import covering_radius, k_center_greedy, k_center_greedy_with_distances
from loraforge.data.mods import (
    EMBEDDING,
    LOW_QUALITY,
    NOT_SELECTED,
    Embedder,
    QualityScorer,
    coverage_count,
    drop_transient_columns,
    instruction_text,
    mark_low_quality,
    mark_mods,
    mods_collect,
    mods_decision,
    mods_resolve,
    necessity_select,
)
from loraforge.data.schema import DROPPED, KEPT, OP_MODS
from loraforge.errors import DataError, ModelError
from loraforge.lab.world import alpaca_to_messages
from loraforge.spec import ModsSpec, NecessitySpec


def task_rows(lab, task: str, split: str = "train") -> list[dict]:
    lines = (lab.data_dir / "tasks" / f"{task}_{split}.jsonl").read_text().splitlines()
    return [json.loads(x) for x in lines]


def as_rows(alpaca: list[dict], source: str = "s", **extra) -> pa.Table:
    return make_rows([{"messages": alpaca_to_messages(r), **extra} for r in alpaca], source=source)


def statuses(table: pa.Table) -> list[tuple]:
    return list(zip(*(table.column(c).to_pylist() for c in ("id", "status", "op", "reason")), strict=True))


@pytest.fixture(scope="module")
def scorer(lab, one_torch_thread):
    return QualityScorer("lab://quality_scorer", batch_size=32)


# ---------------------------------------------------------------- quality
def test_mark_low_quality_drops_exactly_the_rows_below_the_threshold():
    table = make_rows(
        [
            {"user": "a", "answer": "1", "quality": 0.1},
            {"user": "b", "answer": "2", "quality": 0.5},  # at the threshold: kept
            {"user": "c", "answer": "3", "quality": 0.4999},
            {"user": "d", "answer": "4", "quality": 0.9},
            {"user": "e", "answer": "5", "quality": None, "status": DROPPED, "op": "filter", "reason": "too_short"},
            {"user": "f", "answer": "6", "quality": None, "rehearsal": True},  # replay: never judged by MoDS
        ]
    )
    out = mark_low_quality(table, 0.5)
    assert statuses(out) == [
        ("s:1", DROPPED, OP_MODS, LOW_QUALITY),
        ("s:2", KEPT, None, None),
        ("s:3", DROPPED, OP_MODS, LOW_QUALITY),
        ("s:4", KEPT, None, None),
        ("s:5", DROPPED, "filter", "too_short"),
        ("s:6", KEPT, None, None),
    ]
    assert out.column("detail").to_pylist()[0] == "quality 0.100 < threshold 0.5"
    with pytest.raises(DataError, match="s:1 has no quality score"):
        mark_low_quality(make_rows([{"user": "a", "answer": "1"}]), 0.5)


def test_lab_scorer_fills_quality_of_kept_rows_and_separates_good_from_corrupted(lab, scorer):
    rows = task_rows(lab, "max3", "eval")[:6] + task_rows(lab, "sort3", "eval")[:6]
    good = [alpaca_to_messages(r) for r in rows]
    bad = [alpaca_to_messages({**r, "output": "banana " + r["input"][::-1]}) for r in rows]
    table = make_rows([{"messages": m} for m in good + bad])
    table = table.set_column(
        table.schema.get_field_index("rehearsal"), "rehearsal", pa.array([False] * 23 + [True])
    )
    out = scorer(table)
    q = out.column("quality").to_pylist()
    assert q[23] is None  # rehearsal rows are not scored
    assert min(q[:12]) > 0.5 > max(q[12:23])
    assert out.column_names == table.column_names
    dropped = mark_low_quality(out, 0.5)
    assert [s for _, s, _, _ in statuses(dropped)] == [KEPT] * 12 + [DROPPED] * 11 + [KEPT]


def _tiny_classifier(lab, path, num_labels: int):
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(lab.model_dir)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, num_labels=num_labels,
                      pad_token_id=tok.pad_token_id)
    model = LlamaForSequenceClassification(cfg)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return model, tok


@pytest.mark.parametrize("num_labels, mode", [(2, "sigmoid"), (1, "raw"), (1, "sigmoid")])
def test_any_hf_classifier_works_with_documented_output_mapping(lab, tmp_path, one_torch_thread, num_labels, mode):
    import torch

    model, tok = _tiny_classifier(lab, tmp_path, num_labels)
    convs = [alpaca_to_messages(r) for r in task_rows(lab, "add", "eval")[:5]]
    got = QualityScorer(str(tmp_path), batch_size=2, single_label=mode).score_conversations(convs)
    for conv, score in zip(convs, got, strict=True):  # unbatched reference
        enc = tok(tok.apply_chat_template(conv, tokenize=False), add_special_tokens=False, return_tensors="pt")
        with torch.no_grad():
            logits = model(**enc).logits[0]
        if num_labels == 2:
            want = torch.softmax(logits, -1)[1]  # probability of label 1
        else:
            want = logits[0] if mode == "raw" else torch.sigmoid(logits[0])
        assert score == pytest.approx(float(want), abs=1e-5)


def test_classifier_with_more_than_two_labels_is_rejected(lab, tmp_path, one_torch_thread):
    _tiny_classifier(lab, tmp_path, 3)
    with pytest.raises(ModelError, match="3 labels"):
        QualityScorer(str(tmp_path))
    with pytest.raises(ModelError, match="cannot load quality scorer"):
        QualityScorer(str(tmp_path / "nowhere"))


# ---------------------------------------------------------------- coverage: k-center greedy
@settings(max_examples=40, deadline=None)
@given(n=st.integers(2, 60), k=st.integers(1, 12), dim=st.integers(1, 5), seed=st.integers(0, 10_000))
def test_k_center_invariants(n, k, dim, seed):
    x = np.random.default_rng(seed).normal(size=(n, dim))
    picks, dists = k_center_greedy_with_distances(x, k, seed)
    assert len(picks) == min(k, n) == len(set(picks))
    assert dists == sorted(dists, reverse=True)  # each pick is no farther than the one before
    if k >= n:
        return
    radius = covering_radius(x, picks)
    nearest_unpicked = max(
        min(np.linalg.norm(x[i] - x[c]) for c in picks) for i in range(n) if i not in picks
    )
    assert radius == pytest.approx(nearest_unpicked)
    if len(picks) > 1:
        # every point is within the radius of a pick, and picks are pairwise at least that far apart
        pair_min = min(np.linalg.norm(x[a] - x[b]) for a, b in itertools.combinations(picks, 2))
        assert pair_min >= dists[-1] - 1e-9 >= radius - 1e-9


@pytest.mark.parametrize("seed", range(8))
def test_k_center_is_within_twice_the_optimal_radius(seed):
    rng = np.random.default_rng(seed)
    x = np.concatenate([rng.normal(c, 0.3, size=(3, 2)) for c in rng.uniform(-5, 5, size=(3, 2))])
    x = np.concatenate([x, rng.uniform(-5, 5, size=(3, 2))])  # 12 points, some clustered
    for k in (1, 2, 3, 4):
        greedy = covering_radius(x, k_center_greedy(x, k, seed))
        optimal = min(covering_radius(x, list(c)) for c in itertools.combinations(range(len(x)), k))
        assert optimal <= greedy <= 2 * optimal + 1e-9


def test_k_center_edge_cases():
    x = np.zeros((5, 3))  # all duplicates: still k distinct rows
    assert sorted(k_center_greedy(x, 3, 0)) == sorted(set(k_center_greedy(x, 3, 0)))
    assert len(k_center_greedy(x, 3, 0)) == 3
    assert sorted(k_center_greedy(np.eye(4), 10, 0)) == [0, 1, 2, 3]
    assert k_center_greedy(np.eye(4), 0, 0) == [] and k_center_greedy(np.zeros((0, 3)), 2, 0) == []
    assert k_center_greedy(np.eye(6), 3, 5) == k_center_greedy(np.eye(6), 3, 5)
    with pytest.raises(ValueError, match="NaN"):
        k_center_greedy(np.array([[0.0], [np.nan]]), 1, 0)
    with pytest.raises(ValueError, match="2-D"):
        k_center_greedy(np.zeros(4), 1, 0)


def test_coverage_count():
    assert coverage_count(0.3, 10) == 3 and coverage_count(0.25, 10) == 3  # share, rounded up
    assert coverage_count(4, 10) == 4 and coverage_count(50, 10) == 10 and coverage_count(0.3, 0) == 0


# ---------------------------------------------------------------- coverage: embeddings
def test_instruction_text_is_the_prompt_or_the_document():
    assert instruction_text(alpaca_to_messages({"instruction": "Add 1 and 2.", "input": "x", "output": "3"})) == (
        "Add 1 and 2.\n\nx"
    )
    assert instruction_text([{"role": "assistant", "content": "a plain document"}]) == "a plain document"
    with pytest.raises(DataError, match="no assistant"):
        instruction_text([{"role": "user", "content": "q"}])


def test_minilm_embedder_groups_similar_instructions(one_torch_thread):
    table = make_rows(
        [
            {"user": "What is 2 plus 3?", "answer": "5"},
            {"user": "What is 4 plus 1?", "answer": "5"},
            {"user": "Which letter comes first?\n\nq a z", "answer": "q"},
            {"user": "x", "answer": "y", "rehearsal": True},
        ]
    )
    out = Embedder("minilm")(table)
    emb = out.column(EMBEDDING).to_pylist()
    assert emb[3] is None
    v = np.array(emb[:3])
    assert v.shape == (3, 384) and np.allclose(np.linalg.norm(v, axis=1), 1, atol=1e-5)
    assert v[0] @ v[1] > v[0] @ v[2] + 0.2
    assert drop_transient_columns(out).column_names == table.column_names


def test_base_embedder_is_the_padding_independent_mean_hidden_state(lab, one_torch_thread):
    import torch

    emb = Embedder("base", model_ref="lab", batch_size=4)
    texts = ["What is 2 + 3?", "Which number is the largest?\n\n3 9 1", "hi"]
    batched = emb.embed(texts)
    assert batched.shape == (3, 128)
    for text, vec in zip(texts, batched, strict=True):
        enc = emb.tokenizer(text, return_tensors="pt")
        with torch.no_grad():
            h = emb.model(**enc, output_hidden_states=True).hidden_states[-1][0].mean(0).numpy()
        assert np.allclose(vec, h / np.linalg.norm(h), atol=1e-4)
    with pytest.raises(ValueError, match="model_ref"):
        Embedder("base")
    with pytest.raises(ValueError, match="unknown embedder"):
        Embedder("bert")


# ---------------------------------------------------------------- necessity and decision
def test_necessity_adds_what_the_seed_trained_model_has_not_learned(lab, scorer):
    """Seed set: only `add`. The LoRA trained on it answers held-out add rows well and max3 rows badly,
    so the max3 rows are the necessary ones (the method's intent)."""
    add, max3 = task_rows(lab, "add"), task_rows(lab, "max3")
    seed_rows = as_rows(add[:48], "seed")
    candidates = as_rows(add[100:116] + max3[:16], "cand")
    result = necessity_select(
        seed_rows, candidates, "lab", scorer, NecessitySpec(train_steps=40, max_new_tokens=8), quality_threshold=0.5
    )
    assert result.losses[-1] < 0.3 * result.losses[0]  # the seed LoRA learned its set
    ids = candidates.column("id").to_pylist()
    add_ids, max3_ids = set(ids[:16]), set(ids[16:])
    necessary = set(result.necessary)
    assert len(necessary & max3_ids) >= 12 and len(necessary & add_ids) <= 2
    assert set(result.scores) == set(ids) and all(result.scores[i] < 0.5 for i in necessary)
    assert result.necessary == [i for i in ids if i in necessary]  # input order


def test_mark_mods_drops_unselected_rows_but_never_rehearsal():
    table = make_rows(
        [
            {"user": "a", "answer": "1"},
            {"user": "b", "answer": "2"},
            {"user": "c", "answer": "3"},
            {"user": "d", "answer": "4", "rehearsal": True},
            {"user": "e", "answer": "5", "status": DROPPED, "op": "filter", "reason": "too_short"},
        ]
    )
    decision = mods_decision({"s:1"}, {"s:3"})
    decision.necessity_scores, decision.threshold = {"s:2": 0.93, "s:3": 0.1}, 0.5
    out = mark_mods(table, decision)
    assert statuses(out) == [
        ("s:1", KEPT, None, None),
        ("s:2", DROPPED, OP_MODS, NOT_SELECTED),
        ("s:3", KEPT, None, None),
        ("s:4", KEPT, None, None),
        ("s:5", DROPPED, "filter", "too_short"),
    ]
    assert "scored 0.930 >= 0.5" in out.column("detail").to_pylist()[1]
    assert statuses(mark_mods(table, ["s:2"]))[0] == ("s:1", DROPPED, OP_MODS, NOT_SELECTED)


def test_collect_resolve_apply_chain_accounts_for_every_row(lab, scorer):
    """The wiring the Ray pipeline uses, on one in-memory table (two 'batches')."""
    rows = task_rows(lab, "add")[:12] + task_rows(lab, "max3")[:12]
    table = as_rows(rows)
    table = table.set_column(
        table.schema.get_field_index("messages"), "messages",
        pa.array([*table.column("messages").to_pylist()[:-1], alpaca_to_messages(
            {"instruction": "Which number is the largest?", "input": "1 2 3", "output": "zq#!"})],
            table.schema.field("messages").type),
    )
    replay = make_rows([{"user": "r", "answer": "general text", "rehearsal": True}], source="general")
    batches = [table.slice(0, 13), pa.concat_tables([table.slice(13), replay])]
    embedder = Embedder("minilm")
    batches = [embedder(mark_low_quality(scorer(b), 0.5)) for b in batches]
    collected = pa.concat_tables([mods_collect(b) for b in reversed(batches)])  # any arrival order
    assert "s:24" not in collected.column("id").to_pylist()  # the corrupted row was dropped as low quality
    assert "general:1" not in collected.column("id").to_pylist()
    spec = ModsSpec(coverage_size=6, necessity=NecessitySpec(train_steps=4, max_new_tokens=4))
    decision = mods_resolve(collected, spec, base_model_ref="lab", seed=0, scorer=scorer)
    assert len(decision.seed_ids) == 6 and decision.seed_ids <= set(collected.column("id").to_pylist())
    assert decision.selected == decision.seed_ids | decision.necessary_ids
    assert decision.summary["candidates"] == collected.num_rows and decision.summary["coverage_radius"] > 0
    out = pa.concat_tables([drop_transient_columns(mark_mods(b, decision)) for b in batches])
    assert out.num_rows == table.num_rows + 1
    kept_ids = {i for i, s, _, _ in statuses(out) if s == KEPT}
    assert kept_ids == set(decision.selected) | {"general:1"}
    for _, s, op, reason in statuses(out):
        assert s == KEPT or (op, reason) in {(OP_MODS, LOW_QUALITY), (OP_MODS, NOT_SELECTED)}
    again = mods_resolve(collected.take(list(range(collected.num_rows))[::-1]), spec, "lab", seed=0, scorer=scorer)
    assert again.seed_ids == decision.seed_ids  # independent of collection order


def test_collect_requires_embeddings_and_resolve_handles_nothing():
    with pytest.raises(DataError, match="_embedding"):
        mods_collect(make_rows([{"user": "a", "answer": "b"}]))
    empty = mods_collect(make_rows([]).append_column(EMBEDDING, pa.array([], pa.list_(pa.float32()))))
    assert mods_resolve(empty, ModsSpec(), "lab").selected == frozenset()


def test_resolve_caps_necessary_rows_with_k_center_over_them(monkeypatch):
    import loraforge.data.mods as mods

    # 12 rows on a line; necessity (stubbed) flags rows 6..11; a cap of 2 keeps two far-apart ones
    emb = [[float(i), 0.0] for i in range(12)]
    collected = make_rows([{"user": f"q{i}", "answer": "a"} for i in range(12)]).append_column(
        EMBEDDING, pa.array(emb, pa.list_(pa.float32()))
    ).select(["id", "input_index", "line", "sub", "messages", EMBEDDING])
    seen = {}

    def fake_necessity(seed_rows, rest, *args, **kwargs):
        seen["seed"], seen["rest"] = seed_rows.column("id").to_pylist(), rest.column("id").to_pylist()
        flagged = [f"s:{i}" for i in range(7, 13)]
        return mods.NecessityResult(flagged, dict.fromkeys(flagged, 0.1), {}, 0.5, [1.0])

    monkeypatch.setattr(mods, "necessity_select", fake_necessity)
    decision = mods_resolve(collected, ModsSpec(coverage_size=3), "lab", seed=0, max_added=2)
    assert len(seen["seed"]) == 3 and set(seen["seed"]).isdisjoint(seen["rest"]) and len(seen["rest"]) == 9
    assert len(decision.necessary_ids) == 2 and decision.necessary_ids <= {f"s:{i}" for i in range(7, 13)}
    a, b = sorted(int(i.split(":")[1]) for i in decision.necessary_ids)
    assert b - a >= 3  # spread out, not neighbours
    assert decision.summary["necessary"] == 6 and decision.summary["necessary_after_cap"] == 2
