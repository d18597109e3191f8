"""Model-based scores (perplexity, IFD, token cleaning) against a plain per-row computation; IFD
selection and dataset-wide token thresholds against their definitions; train reads the weights back
on exactly the tokens curate scored. No Ray: ScoreRows is called directly, as an actor would be."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from curate_rows import chat, make_rows  # noqa: E402
from lab_adapters import make_random_adapter  # noqa: E402

from loraforge.data.schema import DROPPED, KEPT, KIND_PREFERENCE, KIND_TEXT, OP_SCORES, OUTPUT_SCHEMA  # noqa: E402
from loraforge.data.scores import (  # noqa: E402
    IFD_ABOVE_ONE,
    IFD_BELOW_CUTOFF,
    ScoreRows,
    apply_token_weights,
    collect_ifd,
    collect_token_scores,
    ifd_cutoff,
    mark_ifd,
    token_threshold,
)
from loraforge.spec import ScoresSpec, TokenCleaningSpec  # noqa: E402
from loraforge.train.sft_data import IGNORE_INDEX, tokenize_all, tokenize_conversation  # noqa: E402
from loraforge.train.training_rows import read_training_rows  # noqa: E402

MAX_LEN = 48

ROWS = [
    {"user": "What is 2 + 2?", "answer": "4"},
    {"user": "Which letter comes first?\nb o n", "answer": "b"},
    {"user": "Add 8 and 1.", "answer": "The sum of 8 and 1 is 9."},
    {"messages": chat("Reverse the word cat.", "tac", system="You answer briefly.")},
    {"messages": [  # multi-turn: the last assistant turn is the answer, all before it the instruction
        {"role": "user", "content": "What is 7 plus 0?"}, {"role": "assistant", "content": "7"},
        {"role": "user", "content": "And 7 plus 1?"}, {"role": "assistant", "content": "It is 8."},
    ]},
    {"kind": KIND_TEXT, "messages": [{"role": "assistant", "content": "The cat sat on the mat near the door."}]},
    {"kind": KIND_PREFERENCE, "messages": chat("What is 2 plus 3?", "5"), "rejected": "6"},
    {"user": "word " * 60, "answer": "cut off"},  # the answer does not survive truncation
    {"user": "Spell dog backwards, letter by letter, slowly.", "answer": "g o d"},
    {"user": "What is 9 + 1?", "answer": "10", "status": DROPPED, "op": "filter", "reason": "x"},  # not scored
]


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: see tests/conftest.py


@pytest.fixture(scope="module")
def adapter_dir(model_dir, tmp_path_factory) -> Path:
    return make_random_adapter(Path(model_dir), tmp_path_factory.mktemp("ref") / "adapter", seed=3)


@pytest.fixture(scope="module")
def table() -> pa.Table:
    return make_rows(ROWS)


def _spec(**kw) -> dict:
    return ScoresSpec(max_seq_len=MAX_LEN, **kw).model_dump()


@pytest.fixture(scope="module")
def scored(model_dir, adapter_dir, table) -> pa.Table:
    spec = _spec(batch_size=4, token_cleaning=TokenCleaningSpec(reference_model=str(adapter_dir)))
    return ScoreRows(model_dir, spec)(table)


# ---------------------------------------------------------------- the plain computation
def _models(model_dir: str, adapter_dir: Path):
    from peft import PeftModel

    from loraforge.resolve import load_model, load_tokenizer

    base = load_model(model_dir, dtype=torch.float32).eval()
    ref = PeftModel.from_pretrained(load_model(model_dir, dtype=torch.float32), str(adapter_dir)).eval()
    return load_tokenizer(model_dir), base, ref


def _ce(model, ids: list[int]) -> torch.Tensor:
    """CE of token j given tokens < j, for j = 1..n-1, from one unpadded forward pass."""
    x = torch.tensor([ids])
    with torch.no_grad():
        logits = model(input_ids=x).logits[0]
    return F.cross_entropy(logits[:-1], x[0, 1:], reduction="none")


def _n_tokens(tok, text: str) -> int:
    return len(tok(text, add_special_tokens=False)["input_ids"])


def plain_scores(tok, base, ref, messages) -> dict:
    ex = tokenize_conversation(tok, messages, MAX_LEN)
    ids, labels = ex.input_ids, ex.labels
    base_ce = _ce(base, ids)
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    render = lambda ms, gen: tok.apply_chat_template(ms, tokenize=False, add_generation_prompt=gen)  # noqa: E731
    start = _n_tokens(tok, render(messages[:last], True)) if last else 1
    end = min(_n_tokens(tok, render(messages[: last + 1], False)), len(ids))
    out: dict = {"ppl": None, "ifd": None}
    if start < end:
        conditioned = base_ce[start - 1 : end - 1].mean().item()
        out["ppl"] = math.exp(conditioned)
        if last:
            # the lab template renders a lone answer as "<|bos|><|assistant|>\n" + content + "<|eos|>"
            content = messages[last]["content"]
            solo = render([messages[last]], False)
            assert solo.endswith(content + tok.eos_token)
            header = tok(solo[: -len(content + tok.eos_token)], add_special_tokens=False)["input_ids"]
            direct_ce = _ce(base, header + ids[start:end])
            out["ifd"] = conditioned / direct_ce[len(header) - 1 :].mean().item()
    ref_ce = _ce(ref, ids)
    out["token_scores"] = [
        (base_ce[j - 1] - ref_ce[j - 1]).item() for j in range(1, len(ids)) if labels[j] != IGNORE_INDEX
    ]
    return out


def _close(a, b, tol=1e-4) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return abs(a - b) <= tol * max(1.0, abs(b))


# ---------------------------------------------------------------- scores
def test_batched_scores_equal_the_plain_per_row_computation(model_dir, adapter_dir, table, scored):
    tok, base, ref = _models(model_dir, adapter_dir)
    rows = scored.to_pylist()
    for row in rows:
        if row["status"] != KEPT:
            assert row["ppl"] is None and row["ifd"] is None and row["token_scores"] is None
            continue
        want = plain_scores(tok, base, ref, row["messages"])
        assert _close(row["ppl"], want["ppl"]), row["id"]
        assert _close(row["ifd"], want["ifd"]), row["id"]
        assert len(row["token_scores"]) == len(want["token_scores"]), row["id"]
        assert np.allclose(row["token_scores"], want["token_scores"], atol=1e-4), row["id"]
    by_id = {r["id"]: r for r in rows}
    assert by_id["s:6"]["ppl"] is not None and by_id["s:6"]["ifd"] is None  # text row: ppl only
    assert by_id["s:8"]["ppl"] is None and by_id["s:8"]["ifd"] is None  # answer truncated away
    assert by_id["s:7"]["ifd"] is not None  # preference: the chosen answer is scored
    assert sum(r["ifd"] is not None for r in rows) == 7
    # The adapter changes the model, so the scores are not trivially zero.
    assert max(abs(s) for r in rows if r["token_scores"] for s in r["token_scores"]) > 0.01


def test_ifd_multi_turn_uses_earlier_turns_as_instruction(model_dir, adapter_dir, scored):
    """IFD of the last turn differs from the same answer asked without the first exchange."""
    row = scored.to_pylist()[4]
    single = make_rows([{"messages": row["messages"][2:]}])
    alone = ScoreRows(model_dir, _spec())(single).to_pylist()[0]
    assert row["ifd"] is not None and alone["ifd"] is not None
    assert not math.isclose(row["ifd"], alone["ifd"], rel_tol=1e-3)


def test_batch_composition_and_padding_side_do_not_change_scores(model_dir, adapter_dir, table, scored):
    spec = _spec(batch_size=1, token_cleaning=TokenCleaningSpec(reference_model=str(adapter_dir)))
    scorer = ScoreRows(model_dir, spec)
    scorer.tokenizer.padding_side = "left"  # ignored: sequences are always right-padded
    one_by_one = scorer(table)
    scorer.spec = ScoresSpec.model_validate({**spec, "batch_size": 16})
    reversed_rows = scorer(table.take(list(range(table.num_rows))[::-1]))
    for name in ("ppl", "ifd"):
        a = scored.column(name).to_pylist()
        b = one_by_one.column(name).to_pylist()
        c = reversed_rows.column(name).to_pylist()[::-1]
        assert all(_close(x, y, 1e-5) and _close(x, z, 1e-5) for x, y, z in zip(a, b, c, strict=True)), name
    for x, y in zip(scored.column("token_scores").to_pylist(), one_by_one.column("token_scores").to_pylist(),
                    strict=True):
        assert (x is None and y is None) or np.allclose(x, y, atol=1e-5)


def test_full_model_reference_equals_the_adapter_reference(model_dir, adapter_dir, table, scored, tmp_path):
    from peft import PeftModel

    from loraforge.resolve import load_model, load_tokenizer

    merged = PeftModel.from_pretrained(load_model(model_dir, dtype=torch.float32), str(adapter_dir))
    merged.merge_and_unload().save_pretrained(tmp_path / "ref")
    load_tokenizer(model_dir).save_pretrained(tmp_path / "ref")
    spec = _spec(batch_size=8, token_cleaning=TokenCleaningSpec(reference_model=str(tmp_path / "ref")))
    full = ScoreRows(model_dir, spec)(table)
    for x, y in zip(scored.column("token_scores").to_pylist(), full.column("token_scores").to_pylist(), strict=True):
        assert (x is None and y is None) or np.allclose(x, y, atol=1e-4)
    ppl = zip(full.column("ppl").to_pylist(), scored.column("ppl").to_pylist(), strict=True)
    assert all(_close(a, b, 1e-5) for a, b in ppl)


def test_switches_and_bad_reference(model_dir, table, tmp_path):
    out = ScoreRows(model_dir, _spec(perplexity=False, ifd=False))(table)
    assert set(out.column("ppl").to_pylist()) == {None} and set(out.column("ifd").to_pylist()) == {None}
    assert set(out.column("token_scores").to_pylist()) == {None}
    from loraforge.errors import ModelError

    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "adapter_config.json").write_text("{}")
    with pytest.raises(ModelError, match="reference adapter"):
        ScoreRows(model_dir, _spec(token_cleaning=TokenCleaningSpec(reference_model=str(tmp_path / "bad"))))


# ---------------------------------------------------------------- IFD selection
def _ifd_table(values, rehearsal=None) -> pa.Table:
    rows = [{"user": f"q{i}", "answer": f"a{i}", "ifd": v, "rehearsal": bool(rehearsal and rehearsal[i])}
            for i, v in enumerate(values)]
    return make_rows(rows)


def test_ifd_above_one_dropped_and_top_fraction_kept():
    values = [0.15, 0.95, 1.3, None, 0.55, 0.35, 0.75, 1.05, 0.25, 0.65, 0.45, 0.85, 2.0]
    rehearsal = [False] * 12 + [True]
    t = _ifd_table(values, rehearsal)
    candidates = collect_ifd(t, drop_above_one=True).column("ifd").to_pylist()
    assert sorted(candidates) == sorted(v for v in values[:12] if v is not None and v <= 1)  # 9 values
    cutoff = ifd_cutoff(candidates, 1 / 3)  # top 3 of 9
    assert cutoff == 0.75
    rows = mark_ifd(t, drop_above_one=True, cutoff=cutoff).to_pylist()
    kept = [r["ifd"] for r in rows if r["status"] == KEPT]
    assert kept == [0.95, None, 0.75, 0.85, 2.0]  # top three, the null one, the rehearsal row
    above = [r for r in rows if r["reason"] == IFD_ABOVE_ONE]
    assert [r["ifd"] for r in above] == [1.3, 1.05]
    assert all(r["op"] == OP_SCORES and r["status"] == DROPPED and "1.3000" in above[0]["detail"] for r in above)
    below = [r for r in rows if r["reason"] == IFD_BELOW_CUTOFF]
    assert sorted(r["ifd"] for r in below) == [0.15, 0.25, 0.35, 0.45, 0.55, 0.65]
    assert "0.7500" in below[0]["detail"]
    # Without drop_above_one, rows above 1 are ranked like any other and the top three are the largest.
    loose = mark_ifd(t, drop_above_one=False, cutoff=ifd_cutoff(collect_ifd(t, False).column("ifd"), 0.25))
    assert sorted(r["ifd"] for r in loose.to_pylist() if r["status"] == KEPT and r["ifd"] is not None) == [
        0.95, 1.05, 1.3, 2.0]


def test_ifd_cutoff_edges():
    assert ifd_cutoff([0.3, 0.2], None) is None
    assert ifd_cutoff([], 0.5) is None
    assert ifd_cutoff([0.3, 0.2, 0.1], 0.01) == 0.3  # at least one row is kept
    assert ifd_cutoff(np.array([0.3, 0.2, 0.1]), 1.0) == 0.1
    t = _ifd_table([0.5, 0.5, 0.4])
    assert [r["status"] for r in mark_ifd(t, True, ifd_cutoff([0.5, 0.5, 0.4], 0.34)).to_pylist()] == [
        KEPT, KEPT, DROPPED]  # ties with the cutoff are all kept
    already = mark_ifd(_ifd_table([1.5]), True, None)
    assert mark_ifd(already, True, None).equals(already)  # dropped rows are left alone


# ---------------------------------------------------------------- token threshold and weights
def test_token_threshold_keeps_exactly_the_top_share():
    rng = np.random.default_rng(0)
    per_row = [rng.normal(size=n).astype(np.float32).tolist() for n in (3, 7, 1, 0, 9)]
    flat = np.concatenate([np.asarray(r) for r in per_row])
    for fraction in (0.6, 0.25, 1.0, 0.01):
        k = min(flat.size, max(1, math.floor(fraction * flat.size + 0.5)))
        threshold = token_threshold(per_row, fraction)
        assert threshold == token_threshold(flat, fraction) == token_threshold(pa.array(per_row), fraction)
        assert int((flat >= threshold).sum()) == k
        assert threshold == np.sort(flat)[::-1][k - 1]
    # Ties with the k-th score are all kept, whatever order the tokens come in.
    assert token_threshold([[1.0, 1.0], [1.0, 0.0, 2.0]], 0.4) == 1.0  # k=2, but three tokens score 1
    assert token_threshold([[0.0, 2.0, 1.0], [1.0, 1.0]], 0.4) == 1.0
    assert token_threshold([], 0.6) == -math.inf
    with pytest.raises(ValueError, match="keep_fraction"):
        token_threshold([[1.0]], 0.0)


def test_apply_token_weights():
    t = make_rows([
        {"user": "a", "answer": "b", "token_scores": [0.5, -1.0, 2.0]},
        {"user": "c", "answer": "d", "token_scores": [0.1, 0.9]},
        {"user": "e", "answer": "f"},  # never scored: no weights (all ones in train)
        {"user": "g", "answer": "h", "token_scores": [-5.0, -5.0], "rehearsal": True},  # replay: not cleaned
        {"user": "i", "answer": "j", "token_scores": [9.0], "status": DROPPED, "op": "filter", "reason": "x"},
    ])
    collected = collect_token_scores(t).column("token_score").to_pylist()
    assert collected == pytest.approx([0.5, -1.0, 2.0, 0.1, 0.9])  # kept, non-rehearsal only
    threshold = token_threshold(collected, 0.6)  # top 3 of 5
    assert threshold == pytest.approx(0.5)
    weights = apply_token_weights(t, threshold).column("loss_weights").to_pylist()
    assert weights == [[1.0, 0.0, 1.0], [0.0, 1.0], None, None, None]


# ---------------------------------------------------------------- into train
def test_train_reads_the_weights_on_the_scored_tokens(model_dir, scored, tmp_path):
    """curate scores -> weights -> Parquet output -> train examples: weight k lands on predicted label k."""
    kept = scored.filter(pc.equal(scored.column("status"), KEPT))
    weighted = apply_token_weights(kept, token_threshold(collect_token_scores(kept).column("token_score"), 0.6))
    out = weighted.select(OUTPUT_SCHEMA.names).cast(OUTPUT_SCHEMA)
    positions = list(range(out.num_rows))[::-1]
    out = out.set_column(out.schema.get_field_index("position"), "position", pa.array(positions, pa.int64()))
    (tmp_path / "data").mkdir()
    pq.write_table(out, tmp_path / "data" / "part-0.parquet")

    from loraforge.resolve import load_tokenizer

    rows = read_training_rows(tmp_path)
    assert [r.id for r in rows] == out.column("id").to_pylist()[::-1]  # position order
    tok = load_tokenizer(model_dir)
    examples, skipped = tokenize_all(tok, rows, MAX_LEN)
    assert skipped == 1  # the row whose answer is cut off
    by_id = {r["id"]: r for r in weighted.to_pylist()}
    scored_rows = [r for r in rows if any(x != IGNORE_INDEX for x in tokenize_conversation(tok, r.messages,
                                                                                              MAX_LEN).labels)]
    n_cleaned = 0
    for row, ex in zip(scored_rows, examples, strict=True):
        want = by_id[row.id]["loss_weights"]
        got = [ex.weights[j] for j in range(1, len(ex.labels)) if ex.labels[j] != IGNORE_INDEX]
        assert got == want
        assert all(w == 0.0 for w, label in zip(ex.weights, ex.labels, strict=True) if label == IGNORE_INDEX)
        n_cleaned += want.count(0.0)
    assert n_cleaned > 0
