"""The lab's quality scorer: built once inside the lab folder, loadable as a standard HF classifier,
and good at telling a correct answer from a corrupted one on held-out task rows."""

from __future__ import annotations

import json
import random
import threading
import time
from dataclasses import replace

import pytest

from loraforge.lab.build import lab_key
from loraforge.lab.quality_scorer import (
    CORRUPTIONS,
    ScorerSettings,
    corrupt,
    ensure_quality_scorer,
    labelled_pairs,
    roc_auc,
    scorer_report,
)


@pytest.fixture(scope="module")
def scorer_dir(lab, one_torch_thread):
    return ensure_quality_scorer(lab)


def test_scorer_is_cached_inside_the_lab_without_touching_its_key(lab, scorer_dir):
    t = time.time()
    assert ensure_quality_scorer(lab) == scorer_dir
    assert time.time() - t < 2.0
    assert scorer_dir.parent.parent == lab.root and lab.root.name == lab_key()
    assert (lab.root / "report.json").is_file() and (lab.model_dir / "model.safetensors").is_file()
    for name in ("model.safetensors", "config.json", "tokenizer.json", "report.json"):
        assert (scorer_dir / name).is_file()
    assert not list(scorer_dir.parent.glob(".tmp-*"))


def test_lab_reference_resolves_to_the_scorer(scorer_dir):
    from loraforge.resolve import LAB_QUALITY_SCORER, resolve_data, resolve_model

    assert LAB_QUALITY_SCORER == "lab://quality_scorer"
    assert resolve_model(LAB_QUALITY_SCORER) == str(scorer_dir)
    assert resolve_data(LAB_QUALITY_SCORER) == scorer_dir


def test_report_shows_high_heldout_quality(scorer_dir):
    r = scorer_report(scorer_dir)
    assert r["heldout_auc"] > 0.9, r
    assert r["heldout_accuracy"] > 0.8
    by_kind = r["heldout_accuracy_by_kind"]
    for kind in ("good", "gibberish", "truncated", "echo", "other_task", "shuffled"):
        assert by_kind[kind] > 0.85, (kind, by_kind)
    # the necessity test relies on this: wrong answers to max3 are recognised
    assert r["heldout_accuracy_wrong_number_by_task"]["max3"] > 0.7


def test_loads_as_a_standard_classifier_and_ranks_fresh_heldout_pairs(lab, scorer_dir):
    """Independent of report.json: new corruptions of eval rows, scored through AutoModel* and MoDS's scorer."""
    from transformers import AutoModelForSequenceClassification

    from loraforge.data.mods import QualityScorer

    model = AutoModelForSequenceClassification.from_pretrained(scorer_dir)
    assert model.config.num_labels == 1 and model.config.model_type == "llama"
    rows = {
        t: [json.loads(x) for x in (lab.data_dir / "tasks" / f"{t}_eval.jsonl").read_text().splitlines()]
        for t in lab.tasks
    }
    pairs = labelled_pairs(rows, seed=12345)  # other corruptions than the build's held-out set
    scorer = QualityScorer(str(scorer_dir), batch_size=64)
    scores = scorer.score_conversations(
        [[{"role": "user", "content": p.prompt}, {"role": "assistant", "content": p.answer}] for p in pairs]
    )
    assert all(0.0 < s < 1.0 for s in scores)
    assert roc_auc(scores, [p.label for p in pairs]) > 0.9


def test_corruptions_never_reproduce_the_answer():
    rng = random.Random(0)
    pool = {
        "max3": [{"instruction": "Which number is the largest?", "input": "3 9 1", "output": "9"}],
        "sort3": [{"instruction": "Sort these numbers.", "input": "3 9 1", "output": "1 3 9"}],
        "first_letter": [{"instruction": "Which letter comes first?", "input": "q a z", "output": "q"}],
    }
    kinds = set()
    for _ in range(300):
        task = rng.choice(sorted(pool))
        row = pool[task][0]
        kind, bad = corrupt(row, task, pool, rng)
        assert bad.strip() and bad.strip() != row["output"]
        kinds.add(kind)
    assert kinds == set(CORRUPTIONS)


def test_roc_auc_matches_pairwise_definition():
    rng = random.Random(1)
    for _ in range(20):
        scores = [rng.choice([0.1, 0.2, 0.5, 0.7, 0.9]) for _ in range(15)]
        labels = [rng.randint(0, 1) for _ in range(15)]
        if len(set(labels)) < 2:
            continue
        pos = [s for s, y in zip(scores, labels, strict=True) if y]
        neg = [s for s, y in zip(scores, labels, strict=True) if not y]
        brute = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg) / (len(pos) * len(neg))
        assert roc_auc(scores, labels) == pytest.approx(brute)


def test_concurrent_callers_build_once(lab, tmp_path, monkeypatch, one_torch_thread):
    """Two threads asking for a missing scorer (tiny settings): one builds, the other waits and reuses it."""
    import loraforge.lab.quality_scorer as qs

    fake_lab = replace(lab, root=tmp_path)
    tiny = ScorerSettings(steps=2, batch_size=4, general_rows=0)
    builds = []
    real_build = qs._build
    monkeypatch.setattr(qs, "_build", lambda out, lab_, s: (builds.append(out), real_build(out, lab_, s)))
    results = []
    threads = [threading.Thread(target=lambda: results.append(ensure_quality_scorer(fake_lab, tiny))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(builds) == 1 and len(results) == 2 and results[0] == results[1]
    assert (results[0] / "report.json").is_file() and results[0].parent.parent == tmp_path
