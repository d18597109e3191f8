"""MLflow conventions: one parent run per pipeline, a child run per stage and per Tune trial.

Only `MlflowClient` is used (never the fluent global run), so a `RunRef` can be pickled into
Ray workers and Tune trials and each of them logs to the right run.

Tags every run carries:
  loraforge.stage     pipeline | curate | tune | trial | train | evaluate | serve
  loraforge.pipeline  the pipeline name
Metric names the dashboard relies on:
  train/trial:  loss (per step), learning_rate
  evaluate:     before.accuracy.<task>, after.accuracy.<task>, before.perplexity, after.perplexity,
                forgetting.perplexity_delta
  curate:       rows.in, rows.kept, rows.dropped, rows.merged
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

STAGE_TAG = "loraforge.stage"
PIPELINE_TAG = "loraforge.pipeline"
PARENT_TAG = "mlflow.parentRunId"


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


@dataclass(frozen=True)
class RunRef:
    """A handle on one MLflow run that can travel to other processes."""

    tracking_uri: str
    run_id: str
    experiment_id: str

    def client(self) -> MlflowClient:
        return MlflowClient(tracking_uri=self.tracking_uri)

    def log_params(self, params: dict[str, Any]) -> None:
        flat = _flatten(params)
        items = [Param(k, str(v)[:6000]) for k, v in flat.items()]
        for i in range(0, len(items), 100):
            self.client().log_batch(self.run_id, params=items[i : i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        ts = int(time.time() * 1000)
        items = [Metric(k, float(v), ts, step or 0) for k, v in metrics.items()]
        for i in range(0, len(items), 500):
            self.client().log_batch(self.run_id, metrics=items[i : i + 500])

    def set_tags(self, tags: dict[str, Any]) -> None:
        for k, v in tags.items():
            self.client().set_tag(self.run_id, k, str(v))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self.client().log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self.client().log_artifact(self.run_id, str(path), artifact_path)

    def log_dict(self, data: Any, name: str) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            p = Path(tmp) / name
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(json.dumps(data, indent=2, default=str))
            self.client().log_artifact(self.run_id, str(p), str(Path(name).parent) if "/" in name else None)

    def finish(self, status: str = "FINISHED") -> None:
        self.client().set_terminated(self.run_id, status=status)


def _experiment_id(client: MlflowClient, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    return exp.experiment_id if exp else client.create_experiment(name)


def start_run(
    tracking_uri: str,
    experiment: str,
    run_name: str,
    stage: str,
    pipeline: str,
    parent: RunRef | None = None,
    tags: dict[str, str] | None = None,
) -> RunRef:
    client = MlflowClient(tracking_uri=tracking_uri)
    exp_id = parent.experiment_id if parent else _experiment_id(client, experiment)
    all_tags = {STAGE_TAG: stage, PIPELINE_TAG: pipeline, **(tags or {})}
    if parent:
        all_tags[PARENT_TAG] = parent.run_id
    run = client.create_run(exp_id, run_name=run_name, tags=all_tags)
    return RunRef(tracking_uri, run.info.run_id, exp_id)


def child_run(parent: RunRef, stage: str, run_name: str | None = None, **tags: str) -> RunRef:
    """A run nested under `parent` in the MLflow UI, tagged with its stage."""
    info = parent.client().get_run(parent.run_id)
    pipeline = info.data.tags.get(PIPELINE_TAG, "")
    return start_run(
        parent.tracking_uri, "", run_name or stage, stage, pipeline, parent=parent, tags=dict(tags)
    )
