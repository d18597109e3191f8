"""Manifest statistics of the kept rows: score histograms, PII redactions, rows per kind and group."""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa

SCORE_COLUMNS = ("heuristic_score", "ppl", "ifd", "quality")
HISTOGRAM_BINS = 20


def histogram(values: list[float], bins: int = HISTOGRAM_BINS) -> dict[str, Any]:
    """Counts over equal-width bins plus a summary; {} when there are no values."""
    arr = np.asarray([v for v in values if v is not None and np.isfinite(v)], dtype=np.float64)
    if arr.size == 0:
        return {}
    counts, edges = np.histogram(arr, bins=bins)
    return {
        "n": int(arr.size),
        "min": float(arr.min()),
        "median": float(np.median(arr)),
        "mean": float(arr.mean()),
        "max": float(arr.max()),
        "edges": [float(e) for e in edges],
        "counts": [int(c) for c in counts],
    }


def kept_stats(kept: pa.Table) -> dict[str, Any]:
    """Histograms of every score column that was computed, PII counts per type, rows per kind/group."""
    out: dict[str, Any] = {"score_histograms": {}}
    for col in SCORE_COLUMNS:
        if col in kept.column_names:
            h = histogram(kept.column(col).to_pylist())
            if h:
                out["score_histograms"][col] = h
    pii: Counter[str] = Counter()
    if "pii" in kept.column_names:
        for entry in kept.column("pii").to_pylist():
            for kind, n in entry or []:
                pii[kind] += n
    out["pii_redacted"] = dict(sorted(pii.items()))
    if "lines_removed" in kept.column_names:
        out["lines_removed"] = int(sum(v or 0 for v in kept.column("lines_removed").to_pylist()))
    for col, key in (("kind", "kept_by_kind"), ("group", "kept_by_group")):
        if col in kept.column_names:
            out[key] = dict(sorted(Counter(kept.column(col).to_pylist()).items(), key=lambda kv: str(kv[0])))
    return out
