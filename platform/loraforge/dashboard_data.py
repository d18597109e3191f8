"""What the dashboard shows, read from MLflow only: pipeline runs, their stages, loss curves, eval tables.

Every function takes the tracking URI, so the same code serves a laptop server and an in-cluster one.
The run layout and metric names follow the conventions in `loraforge.tracking`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

import pandas as pd
from mlflow.entities import Run, ViewType
from mlflow.tracking import MlflowClient

from loraforge.cluster import mlflow_alive
from loraforge.errors import ClusterError
from loraforge.tracking import PARENT_TAG, PIPELINE_TAG, STAGE_TAG

LOSS_METRIC = "loss"
FORGETTING_METRIC = "forgetting.perplexity_delta"
GENERAL_TASK = "general"  # the row label for perplexity on the general held-out text
EVAL_COLUMNS = ["task", "metric", "before", "after", "delta"]
MAX_NESTING = 3  # pipeline -> tune -> trial is the deepest layout tracking.py produces


@dataclass(frozen=True)
class RunSummary:
    """One MLflow run as the dashboard lists it."""

    run_id: str
    name: str
    stage: str
    status: str
    start_time: datetime | None
    end_time: datetime | None
    pipeline: str
    experiment_id: str
    parent_run_id: str | None


def _time(ms: int | None) -> datetime | None:
    return datetime.fromtimestamp(ms / 1000, tz=UTC) if ms else None


def _summary(run: Run) -> RunSummary:
    tags = run.data.tags
    return RunSummary(
        run_id=run.info.run_id,
        name=run.info.run_name or tags.get("mlflow.runName", run.info.run_id),
        stage=tags.get(STAGE_TAG, ""),
        status=run.info.status,
        start_time=_time(run.info.start_time),
        end_time=_time(run.info.end_time),
        pipeline=tags.get(PIPELINE_TAG, ""),
        experiment_id=run.info.experiment_id,
        parent_run_id=tags.get(PARENT_TAG),
    )


def ensure_reachable(tracking_uri: str, timeout: float = 3.0) -> None:
    """Fail fast on a dead HTTP server: MlflowClient itself retries with back-off for minutes."""
    if tracking_uri.startswith(("http://", "https://")) and not mlflow_alive(tracking_uri, timeout):
        raise ClusterError(f"no MLflow server answers at {tracking_uri}")


def _search_all(client: MlflowClient, experiment_ids: list[str], filter_string: str) -> list[Run]:
    runs: list[Run] = []
    token: str | None = None
    while True:
        page = client.search_runs(
            experiment_ids,
            filter_string=filter_string,
            run_view_type=ViewType.ACTIVE_ONLY,
            max_results=500,
            order_by=["attributes.start_time DESC"],
            page_token=token,
        )
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def list_pipeline_runs(tracking_uri: str) -> list[RunSummary]:
    """Pipeline (parent) runs of every experiment, newest first."""
    ensure_reachable(tracking_uri)
    client = MlflowClient(tracking_uri=tracking_uri)
    exp_ids = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ACTIVE_ONLY)]
    if not exp_ids:
        return []
    runs = _search_all(client, exp_ids, f"tags.`{STAGE_TAG}` = 'pipeline'")
    return sorted((_summary(r) for r in runs), key=_newest_first)


def _newest_first(run: RunSummary) -> float:
    return -(run.start_time.timestamp() if run.start_time else 0.0)


def child_runs(tracking_uri: str, parent_run_id: str, recursive: bool = True) -> list[RunSummary]:
    """Stage runs under a pipeline run in start order; with `recursive`, Tune trials nested under a
    tune run too (each one names its parent in `parent_run_id`)."""
    ensure_reachable(tracking_uri)
    client = MlflowClient(tracking_uri=tracking_uri)
    exp_id = client.get_run(parent_run_id).info.experiment_id  # children share the parent's experiment
    found: list[RunSummary] = []
    frontier = [parent_run_id]
    for _ in range(MAX_NESTING if recursive else 1):
        level: list[RunSummary] = []
        for pid in frontier:
            level += [_summary(r) for r in _search_all(client, [exp_id], f"tags.`{PARENT_TAG}` = '{pid}'")]
        if not level:
            break
        found += level
        frontier = [r.run_id for r in level]
    return sorted(found, key=lambda r: r.start_time.timestamp() if r.start_time else 0.0)


def runs_table(runs: list[RunSummary]) -> pd.DataFrame:
    """Runs as a table for display (times in UTC, duration in seconds)."""
    rows = [
        {
            "name": r.name,
            "stage": r.stage,
            "status": r.status,
            "started_utc": r.start_time.replace(tzinfo=None) if r.start_time else None,
            "duration_s": (r.end_time - r.start_time).total_seconds() if r.start_time and r.end_time else None,
            "pipeline": r.pipeline,
            "run_id": r.run_id,
        }
        for r in runs
    ]
    return pd.DataFrame(rows, columns=["name", "stage", "status", "started_utc", "duration_s", "pipeline", "run_id"])


def loss_history(tracking_uri: str, run_id: str, metric: str = LOSS_METRIC) -> pd.DataFrame:
    """Columns step, value, sorted by step; empty when the run logged no such metric."""
    client = MlflowClient(tracking_uri=tracking_uri)
    points = client.get_metric_history(run_id, metric)
    df = pd.DataFrame([(m.step, m.value) for m in points], columns=["step", "value"])
    # A resumed run can log a step twice; the later point is the one that counts.
    return df.drop_duplicates("step", keep="last").sort_values("step").reset_index(drop=True)


def loss_curves(tracking_uri: str, runs: list[RunSummary], metric: str = LOSS_METRIC) -> pd.DataFrame:
    """Wide table: index step, one column per run (named after the run) that logged `metric`."""
    series: dict[str, pd.Series] = {}
    for r in runs:
        hist = loss_history(tracking_uri, r.run_id, metric)
        if hist.empty:
            continue
        label = r.name if r.name not in series else f"{r.name} ({r.run_id[:8]})"
        series[label] = hist.set_index("step")["value"]
    if not series:
        return pd.DataFrame()
    wide = pd.DataFrame(series)
    wide.index.name = "step"
    return wide


def before_after_table(metrics: dict[str, float]) -> pd.DataFrame:
    """Tidy task/metric/before/after/delta rows from an evaluate run's metrics.

    Accuracy rows come from before.accuracy.<task> / after.accuracy.<task>; the perplexity row (task
    "general") takes its delta from forgetting.perplexity_delta when logged, else after - before.
    """
    rows: list[dict[str, object]] = []
    tasks = sorted(
        {k.split(".", 2)[2] for k in metrics if k.startswith(("before.accuracy.", "after.accuracy."))}
    )
    for task in tasks:
        before = metrics.get(f"before.accuracy.{task}")
        after = metrics.get(f"after.accuracy.{task}")
        delta = after - before if before is not None and after is not None else None
        rows.append({"task": task, "metric": "accuracy", "before": before, "after": after, "delta": delta})
    before_ppl, after_ppl = metrics.get("before.perplexity"), metrics.get("after.perplexity")
    if before_ppl is not None or after_ppl is not None or FORGETTING_METRIC in metrics:
        delta = metrics.get(FORGETTING_METRIC)
        if delta is None and before_ppl is not None and after_ppl is not None:
            delta = after_ppl - before_ppl
        rows.append(
            {"task": GENERAL_TASK, "metric": "perplexity", "before": before_ppl, "after": after_ppl, "delta": delta}
        )
    return pd.DataFrame(rows, columns=EVAL_COLUMNS).astype(
        {"before": "float64", "after": "float64", "delta": "float64"}
    )


def run_metrics(tracking_uri: str, run_id: str) -> dict[str, float]:
    """Latest value of every metric of a run."""
    return dict(MlflowClient(tracking_uri=tracking_uri).get_run(run_id).data.metrics)


def evaluation_table(tracking_uri: str, evaluate_run_id: str) -> pd.DataFrame:
    """The before/after table of one evaluate run."""
    return before_after_table(run_metrics(tracking_uri, evaluate_run_id))


def forgetting_delta(metrics: dict[str, float]) -> float | None:
    """Perplexity drift on general text: > 0 means the fine-tune forgot something."""
    if FORGETTING_METRIC in metrics:
        return metrics[FORGETTING_METRIC]
    before, after = metrics.get("before.perplexity"), metrics.get("after.perplexity")
    return after - before if before is not None and after is not None else None
