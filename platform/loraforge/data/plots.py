"""The curation funnel as a picture (rows left after each op), for MLflow and the dashboard."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def save_funnel_plot(steps: list[dict[str, Any]], path: str | Path, title: str = "curation funnel") -> Path:
    """Bar chart of `[{"step", "rows"}]`; uses the Agg canvas directly so no GUI backend is touched."""
    path = Path(path)
    fig = Figure(figsize=(6, 3.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    names = [s["step"] for s in steps]
    rows = [s["rows"] for s in steps]
    bars = ax.bar(names, rows, color="#4C72B0")
    ax.bar_label(bars, labels=[f"{r:,}" for r in rows], padding=2)
    ax.set_ylabel("rows")
    ax.set_title(title)
    ax.set_ylim(0, max(rows + [1]) * 1.15)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path
