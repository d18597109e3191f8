"""Mixture: exact group shares, rehearsal share, curriculum order with spread-out replay, determinism."""

from __future__ import annotations

import math
import random
from fractions import Fraction

import pyarrow as pa
import pytest
from curate_rows import make_rows
from hypothesis import given, settings
from hypothesis import strategies as st

from loraforge.data.mixture import (
    OVER_PROPORTION,
    REHEARSAL_CAP,
    apply_mixture,
    interleave_positions,
    mixture_collect,
    mixture_plan,
)
from loraforge.data.schema import DROPPED, KEPT, OP_MIXTURE
from loraforge.errors import DataError
from loraforge.spec import CurriculumSpec, MixtureSpec


def rows(groups: dict[str, int], rehearsal: int = 0, scores: list[float | None] | None = None) -> pa.Table:
    """Rows in input order: each group's rows, then the rehearsal rows (group 'general')."""
    out = []
    for g, n in groups.items():
        out += [{"user": f"{g} q{i}", "answer": f"a{i}", "group": g} for i in range(n)]
    out += [{"user": f"replay {i}", "answer": "text", "group": "general", "rehearsal": True} for i in range(rehearsal)]
    if scores is not None:
        for r, s in zip(out, scores, strict=False):
            r["ifd"] = s
    return make_rows(out)


def kept(table: pa.Table) -> pa.Table:
    return table.filter(pa.compute.equal(table.column("status"), KEPT))


def count_by_group(table: pa.Table) -> dict[str, int]:
    out: dict[str, int] = {}
    for g in kept(table).column("group").to_pylist():
        out[g] = out.get(g, 0) + 1
    return out


def test_proportions_keep_the_largest_mixture_with_exact_shares():
    table = rows({"long": 100, "short": 30})
    spec = MixtureSpec(proportions={"long": 0.6, "short": 0.4}, rehearsal_share=0.0)
    plan = mixture_plan(table, spec, seed=0)
    out = apply_mixture(table, plan)
    # N* = min(100 / 0.6, 30 / 0.4) = 75: short (the scarce group) keeps all 30, long keeps 0.6 * 75 = 45
    assert count_by_group(out) == {"long": 45, "short": 30}
    assert out.num_rows == table.num_rows  # nothing disappears: the excess is marked
    dropped = out.filter(pa.compute.equal(out.column("status"), DROPPED)).to_pylist()
    assert len(dropped) == 55 and {(r["op"], r["reason"], r["group"]) for r in dropped} == {
        (OP_MIXTURE, OVER_PROPORTION, "long")
    }
    assert "allows 45" in dropped[0]["detail"]
    assert plan.summary["groups"]["long"] == {"rows": 100, "kept": 45, "target_share": 0.6, "share": 0.6}
    assert plan.summary["groups"]["short"]["share"] == pytest.approx(0.4)
    assert plan.summary["dropped"] == {OVER_PROPORTION: 55, REHEARSAL_CAP: 0}


@settings(max_examples=60, deadline=None)
@given(
    counts=st.lists(st.integers(1, 60), min_size=1, max_size=4),
    weights=st.lists(st.integers(1, 20), min_size=4, max_size=4),
)
def test_group_counts_are_floors_of_the_shares_of_the_largest_feasible_size(counts, weights):
    groups = {f"g{i}": n for i, n in enumerate(counts)}
    total = sum(weights[: len(counts)])
    proportions = {f"g{i}": weights[i] / total for i in range(len(counts))}
    if abs(sum(proportions.values()) - 1) > 1e-6:
        return
    plan = mixture_plan(rows(groups), MixtureSpec(proportions=proportions, rehearsal_share=0.0), seed=1)
    got = {g: s["kept"] for g, s in plan.summary["groups"].items()}
    shares = {g: Fraction(weights[i], total) for i, g in enumerate(groups)}
    size = min(Fraction(groups[g]) / shares[g] for g in groups)  # the largest N every group can supply
    for g in groups:
        assert got[g] == math.floor(shares[g] * size) <= groups[g]
    assert any(got[g] == groups[g] for g in groups)  # the scarcest group is not cut
    assert len(plan.positions) == sum(got.values())


def test_rehearsal_rows_are_capped_at_their_share_of_the_output():
    table = rows({"task": 95}, rehearsal=20)
    plan = mixture_plan(table, MixtureSpec(rehearsal_share=0.05), seed=0)
    out = apply_mixture(table, plan)
    reh = kept(out).filter(pa.compute.equal(kept(out).column("rehearsal"), True))
    assert reh.num_rows == 5  # 5 / (95 + 5) = 5%
    assert plan.summary["rehearsal"] == {"rows": 20, "kept": 5, "target_share": 0.05, "share": 0.05, "short": False}
    capped = [r for r in out.to_pylist() if r["reason"] == REHEARSAL_CAP]
    assert len(capped) == 15 and all(r["rehearsal"] and r["op"] == OP_MIXTURE for r in capped)
    assert count_by_group(out)["task"] == 95  # rehearsal never displaces task rows


def test_too_few_rehearsal_rows_are_all_kept_and_the_share_reported():
    plan = mixture_plan(rows({"task": 90}, rehearsal=2), MixtureSpec(rehearsal_share=0.1), seed=0)
    assert not plan.drops
    assert plan.summary["rehearsal"]["short"] is True
    assert plan.summary["rehearsal"]["share"] == pytest.approx(2 / 92)


def test_rehearsal_share_zero_drops_all_replay():
    plan = mixture_plan(rows({"task": 10}, rehearsal=3), MixtureSpec(rehearsal_share=0.0), seed=0)
    assert sorted(v[0] for v in plan.drops.values()) == [REHEARSAL_CAP] * 3


def test_curriculum_orders_by_score_with_nulls_last_and_ties_in_input_order():
    scores = [0.5, None, 0.2, 0.9, 0.2, None, 0.7]
    table = rows({"task": 7}, scores=scores)
    ids = table.column("id").to_pylist()
    for order, expected in [
        ("ascending", [2, 4, 0, 6, 3, 1, 5]),
        ("descending", [3, 6, 0, 2, 4, 1, 5]),
    ]:
        spec = MixtureSpec(rehearsal_share=0.0, curriculum=CurriculumSpec(by="ifd", order=order))
        out = apply_mixture(table, mixture_plan(table, spec, seed=0))
        by_position = sorted(out.to_pylist(), key=lambda r: r["position"])
        assert [r["id"] for r in by_position] == [ids[i] for i in expected]


def test_without_curriculum_positions_follow_input_order_with_replay_spread_evenly():
    table = rows({"a": 30, "b": 27}, rehearsal=3)
    out = apply_mixture(table, mixture_plan(table, MixtureSpec(rehearsal_share=0.05), seed=0))
    order = sorted(kept(out).to_pylist(), key=lambda r: r["position"])
    assert [r["position"] for r in order] == list(range(60))
    main = [r["line"] for r in order if not r["rehearsal"]]
    assert main == sorted(main)
    replay = [r["position"] for r in order if r["rehearsal"]]
    assert replay == [10, 30, 50]  # the middle of each third of the output


@given(n_main=st.integers(0, 300), n_reh=st.integers(1, 60))
def test_interleaving_spaces_replay_evenly(n_main, n_reh):
    slots = interleave_positions(n_main, n_reh)
    total = n_main + n_reh
    assert len(set(slots)) == n_reh and all(0 <= s < total for s in slots)
    gaps = [b - a for a, b in zip(slots, slots[1:], strict=False)]
    assert not gaps or max(gaps) - min(gaps) <= 1  # evenly spread, not bunched
    assert slots[0] <= total / n_reh / 2 and total - 1 - slots[-1] <= total / n_reh / 2 + 1


def test_curriculum_column_also_decides_which_excess_rows_go():
    scores = [float(i) for i in range(20)] + [1.0] * 5
    table = rows({"big": 20, "small": 5}, scores=scores)
    spec = MixtureSpec(
        proportions={"big": 0.5, "small": 0.5}, rehearsal_share=0.0, curriculum=CurriculumSpec(by="ifd")
    )
    out = apply_mixture(table, mixture_plan(table, spec, seed=0))
    kept_big = sorted(r["ifd"] for r in kept(out).to_pylist() if r["group"] == "big")
    assert kept_big == [15.0, 16.0, 17.0, 18.0, 19.0]  # lowest scores dropped first


def test_plan_is_deterministic_under_a_seed_and_independent_of_row_order():
    table = rows({"a": 50, "b": 10}, rehearsal=8)
    spec = MixtureSpec(proportions={"a": 0.5, "b": 0.5}, rehearsal_share=0.1)
    plan = mixture_plan(table, spec, seed=3)
    shuffled = table.take(random.Random(0).sample(range(table.num_rows), table.num_rows))
    again = mixture_plan(shuffled, spec, seed=3)
    assert again.drops == plan.drops and again.positions == plan.positions
    other = mixture_plan(table, spec, seed=4)
    assert set(other.drops) != set(plan.drops) and len(other.drops) == len(plan.drops)


def test_collect_keeps_only_kept_rows_and_the_needed_columns():
    table = rows({"a": 4}, scores=[1.0, 2.0, 3.0, 4.0])
    table = table.set_column(
        table.schema.get_field_index("status"), "status", pa.array([KEPT, DROPPED, KEPT, KEPT])
    )
    spec = MixtureSpec(curriculum=CurriculumSpec(by="ifd"))
    keys = mixture_collect(table, spec)
    assert keys.num_rows == 3 and keys.column_names == ["id", "input_index", "line", "sub", "group", "rehearsal", "ifd"]
    out = apply_mixture(table, mixture_plan(keys, spec, seed=0))
    assert out.column("position").to_pylist() == [0, None, 1, 2]
    assert out.column("status").to_pylist() == [KEPT, DROPPED, KEPT, KEPT]


def test_group_named_without_rows_is_a_clear_error():
    with pytest.raises(DataError, match=r"names group\(s\) \['missing'\] with no kept"):
        mixture_plan(rows({"a": 5}), MixtureSpec(proportions={"a": 0.5, "missing": 0.5}), seed=0)


def test_group_with_rows_but_no_proportion_is_a_clear_error():
    with pytest.raises(DataError, match=r"group\(s\) \['b'\] have kept rows but no share"):
        mixture_plan(rows({"a": 5, "b": 5}), MixtureSpec(proportions={"a": 1.0}), seed=0)


def test_missing_curriculum_column_and_unplanned_rows_are_errors():
    keys = rows({"a": 3}).select(["id", "input_index", "line", "sub", "group", "rehearsal"])
    with pytest.raises(DataError, match=r"column\(s\) \['ifd'\]"):
        mixture_plan(keys, MixtureSpec(curriculum=CurriculumSpec(by="ifd")), seed=0)
    plan = mixture_plan(rows({"a": 3}), MixtureSpec(), seed=0)
    with pytest.raises(DataError, match="not in the mixture plan"):
        apply_mixture(rows({"a": 4}), plan)
