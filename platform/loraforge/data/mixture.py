"""Mixture and schedule: group proportions, rehearsal share and curriculum order (driver-side plan).

The plan is a pure function of the kept rows' keys (id, order keys, group, rehearsal and the score
column used), the MixtureSpec and a seed; `apply_mixture` applies it per batch. Wiring (Ray Data):

    keys = pa.concat_tables(ray.get(ds.map_batches(mixture_collect, fn_kwargs={"spec": spec.mixture},
                                                   batch_format="pyarrow").to_arrow_refs()))
    plan = mixture_plan(keys, spec.mixture, seed)                        # driver; plan.summary -> manifest
    ds = ds.map_batches(apply_mixture, fn_kwargs={"plan": plan}, batch_format="pyarrow")

Rules (n_g: kept non-rehearsal rows of group g, p_g: its proportion):
- proportions: the output size N* = min_g n_g / p_g is the largest at which every group can supply
  its share; group g keeps floor(p_g * N*) rows (the scarcest group keeps all of its rows, every
  other group is within one row of its exact share). The excess is dropped (op mixture, reason
  over_proportion): lowest `drop_by` score first (default: the curriculum column; null scores first),
  ties and the no-score case by a seeded hash of the row id (order-independent, reproducible).
  A group named in proportions without rows, or a group with rows but no proportion, is a DataError.
- rehearsal: rehearsal rows are `rehearsal_share` of the final output: floor(s / (1 - s) * N) of them
  are kept (excess dropped by the same seeded hash, reason rehearsal_cap); with fewer available all
  are kept and the summary reports the share achieved.
- curriculum: `position` 0..T-1 orders non-rehearsal rows by the curriculum column (ascending or
  descending, nulls last, ties by input order), or by input order without a curriculum; rehearsal
  rows (input order) are spread evenly through it, the j-th at floor((j + 1/2) * T / R), so replay is
  spaced across training instead of bunched at one end.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from loraforge.data.ops import mark_rows
from loraforge.data.schema import DROPPED, KEPT, OP_MIXTURE, ORDER_KEYS, ROW_SCHEMA
from loraforge.errors import DataError
from loraforge.spec import MixtureSpec

OVER_PROPORTION, REHEARSAL_CAP = "over_proportion", "rehearsal_cap"
KEY_COLUMNS = ["id", *ORDER_KEYS, "group", "rehearsal"]


@dataclass
class MixturePlan:
    """Per kept row id: dropped (reason, detail) or its output position. Picklable."""

    drops: dict[str, tuple[str, str]] = field(default_factory=dict)
    positions: dict[str, int] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)


def score_columns(spec: MixtureSpec, drop_by: str | None = None) -> list[str]:
    cols = [c for c in (drop_by, spec.curriculum.by if spec.curriculum else None) if c]
    return list(dict.fromkeys(cols))


def mixture_collect(table: pa.Table, spec: MixtureSpec, drop_by: str | None = None) -> pa.Table:
    """Per batch: the keys of kept rows that mixture_plan needs."""
    cols = KEY_COLUMNS + score_columns(spec, drop_by)
    _require_columns(table, cols)
    kept = table.filter(pc.equal(table.column("status"), KEPT))
    return kept.select(cols)


def _require_columns(table: pa.Table, cols: list[str]) -> None:
    missing = [c for c in cols if c not in table.column_names]
    if missing:
        raise DataError(f"mixture needs column(s) {missing}; the table has {table.column_names}")


def _fraction(x: float) -> Fraction:
    return Fraction(x).limit_denominator(1_000_000)  # 0.6 -> 3/5 exactly, so floors are not off by one


def _hash_key(seed: int, row_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{seed}\x00{row_id}".encode(), digest_size=8).digest(), "big")


def _keep_order(rows: list[dict[str, Any]], seed: int, drop_by: str | None) -> list[dict[str, Any]]:
    """Rows best-first: highest `drop_by` score (nulls last), then seeded hash; the tail is dropped."""

    def key(r: dict[str, Any]) -> tuple:
        h = _hash_key(seed, r["id"])
        if drop_by is None:
            return (h,)
        v = r.get(drop_by)
        return (v is None or (isinstance(v, float) and math.isnan(v)), -(v or 0.0), h)

    return sorted(rows, key=key)


def _curriculum_order(rows: list[dict[str, Any]], spec: MixtureSpec) -> list[dict[str, Any]]:
    """Rows are in input order already; a stable sort by score keeps input order among ties."""
    if spec.curriculum is None:
        return rows
    by, desc = spec.curriculum.by, spec.curriculum.order == "descending"

    def missing(v: Any) -> bool:
        return v is None or (isinstance(v, float) and math.isnan(v))

    scored = [r for r in rows if not missing(r[by])]
    unscored = [r for r in rows if missing(r[by])]
    return sorted(scored, key=lambda r: r[by], reverse=desc) + unscored  # sorted is stable with reverse too


def interleave_positions(n_main: int, n_rehearsal: int) -> list[int]:
    """Positions of the rehearsal rows in an output of n_main + n_rehearsal rows, evenly spaced."""
    total = n_main + n_rehearsal
    return [math.floor((j + 0.5) * total / n_rehearsal) for j in range(n_rehearsal)] if n_rehearsal else []


def mixture_plan(rows: pa.Table, spec: MixtureSpec, seed: int, drop_by: str | None = None) -> MixturePlan:
    """Plan the mixture over the kept rows' keys (see module doc). `drop_by` defaults to the curriculum column."""
    if drop_by is None and spec.curriculum is not None:
        drop_by = spec.curriculum.by
    _require_columns(rows, KEY_COLUMNS + score_columns(spec, drop_by))
    if "status" in rows.column_names:
        rows = rows.filter(pc.equal(rows.column("status"), KEPT))
    rows = rows.sort_by([(k, "ascending") for k in ORDER_KEYS])  # independent of the order Ray collected
    records = rows.to_pylist()
    for col in score_columns(spec, drop_by):
        if not (pa.types.is_integer(rows.schema.field(col).type) or pa.types.is_floating(rows.schema.field(col).type)):
            raise DataError(f"mixture score column {col!r} must be numeric, got {rows.schema.field(col).type}")
    ids = [r["id"] for r in records]
    if len(set(ids)) != len(ids):
        raise DataError("mixture_plan got duplicate row ids")
    for r in records:
        if r["group"] is None:
            raise DataError(f"row {r['id']} has no mixture group")

    main = [r for r in records if not r["rehearsal"]]
    rehearsal = [r for r in records if r["rehearsal"]]
    by_group: dict[str, list[dict[str, Any]]] = {}
    for r in main:
        by_group.setdefault(r["group"], []).append(r)

    plan = MixturePlan()
    kept_main: list[dict[str, Any]] = []
    groups_summary: dict[str, dict[str, Any]] = {}
    if spec.proportions is None:
        kept_main = main
        targets = {g: len(rs) for g, rs in by_group.items()}
    else:
        empty = sorted(g for g in spec.proportions if g not in by_group)
        if empty:
            raise DataError(
                f"mixture.proportions names group(s) {empty} with no kept non-rehearsal rows "
                f"(groups with rows: {sorted(by_group)})"
            )
        unnamed = sorted(g for g in by_group if g not in spec.proportions)
        if unnamed:
            raise DataError(
                f"group(s) {unnamed} have kept rows but no share in mixture.proportions "
                f"(named: {sorted(spec.proportions)}); add them or drop those inputs"
            )
        shares = {g: _fraction(p) for g, p in spec.proportions.items()}
        total_share = sum(shares.values())
        shares = {g: p / total_share for g, p in shares.items()}
        size = min(Fraction(len(by_group[g])) / p for g, p in shares.items())  # N*
        targets = {g: math.floor(p * size) for g, p in shares.items()}
        for g, rs in by_group.items():
            ranked = _keep_order(rs, seed, drop_by)
            keep_ids = {r["id"] for r in ranked[: targets[g]]}
            for r in ranked[targets[g] :]:
                plan.drops[r["id"]] = (
                    OVER_PROPORTION,
                    f"group {g!r} has {len(rs)} rows; its share {float(shares[g]):.4g} of the mixture "
                    f"allows {targets[g]}",
                )
            kept_main.extend(r for r in rs if r["id"] in keep_ids)
        kept_main.sort(key=lambda r: tuple(r[k] for k in ORDER_KEYS))

    n_main = len(kept_main)
    share = _fraction(spec.rehearsal_share)
    rehearsal_target = math.floor(share / (1 - share) * n_main)
    ranked_reh = _keep_order(rehearsal, seed, None)
    kept_reh_ids = {r["id"] for r in ranked_reh[:rehearsal_target]}
    for r in ranked_reh[rehearsal_target:]:
        plan.drops[r["id"]] = (
            REHEARSAL_CAP,
            f"rehearsal_share {spec.rehearsal_share:g} of an output with {n_main} non-rehearsal rows "
            f"allows {rehearsal_target} rehearsal rows ({len(rehearsal)} available)",
        )
    kept_reh = [r for r in rehearsal if r["id"] in kept_reh_ids]

    ordered = _curriculum_order(kept_main, spec)
    reh_slots = interleave_positions(len(ordered), len(kept_reh))
    slot_set = set(reh_slots)
    main_slots = [p for p in range(len(ordered) + len(kept_reh)) if p not in slot_set]
    plan.positions = {r["id"]: p for r, p in zip(ordered, main_slots, strict=True)}
    plan.positions.update({r["id"]: p for r, p in zip(kept_reh, reh_slots, strict=True)})

    total = n_main + len(kept_reh)
    for g, rs in sorted(by_group.items()):
        kept_g = targets[g] if spec.proportions is not None else len(rs)
        groups_summary[g] = {
            "rows": len(rs),
            "kept": kept_g,
            "target_share": spec.proportions[g] if spec.proportions is not None else None,
            "share": kept_g / n_main if n_main else 0.0,
        }
    plan.summary = {
        "input_rows": len(records),
        "output_rows": total,
        "non_rehearsal_rows": n_main,
        "groups": groups_summary,
        "rehearsal": {
            "rows": len(rehearsal),
            "kept": len(kept_reh),
            "target_share": spec.rehearsal_share,
            "share": len(kept_reh) / total if total else 0.0,
            "short": len(rehearsal) < rehearsal_target,
        },
        "dropped": {
            OVER_PROPORTION: sum(1 for v in plan.drops.values() if v[0] == OVER_PROPORTION),
            REHEARSAL_CAP: sum(1 for v in plan.drops.values() if v[0] == REHEARSAL_CAP),
        },
        "curriculum": spec.curriculum.model_dump() if spec.curriculum else None,
        "drop_by": drop_by,
        "seed": seed,
    }
    return plan


def apply_mixture(table: pa.Table, plan: MixturePlan) -> pa.Table:
    """Mark rows the plan drops (op mixture) and set `position` of the rows it keeps."""
    statuses = table.column("status").to_pylist()
    ids = table.column("id").to_pylist()
    positions = table.column("position").to_pylist()
    updates = {}
    for pos, (status, row_id) in enumerate(zip(statuses, ids, strict=True)):
        if status != KEPT:
            continue
        if row_id in plan.drops:
            reason, detail = plan.drops[row_id]
            updates[pos] = {"status": DROPPED, "op": OP_MIXTURE, "reason": reason, "detail": detail}
            positions[pos] = None
        elif row_id in plan.positions:
            positions[pos] = plan.positions[row_id]
        else:
            raise DataError(f"row {row_id} is kept but not in the mixture plan (planned from other rows?)")
    table = table.set_column(
        table.schema.get_field_index("position"), "position", pa.array(positions, ROW_SCHEMA.field("position").type)
    )
    return mark_rows(table, updates)
