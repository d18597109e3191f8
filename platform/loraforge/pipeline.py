"""Run a pipeline spec stage by stage: one MLflow parent run, a child run per stage.

Outputs flow forward: curate's Parquet feeds tune and train, tune's best config updates train,
train's adapter feeds evaluate and serve. Stage modules are imported lazily so a job that
only curates never imports torch-heavy code.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from loraforge import paths
from loraforge.context import StageContext
from loraforge.spec import (
    AdapterRef,
    CurateSpec,
    EvaluateSpec,
    PipelineSpec,
    ServeSpec,
    TrainSpec,
    TuneSpec,
)
from loraforge.tracking import RunRef, child_run, start_run

console = Console(stderr=True)


@dataclass
class PipelineResult:
    run_dir: Path
    mlflow_uri: str | None
    run: RunRef | None
    outputs: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"run_dir": str(self.run_dir)}
        if self.run:
            out["mlflow_uri"] = self.mlflow_uri
            out["mlflow_run_id"] = self.run.run_id
            out["mlflow_run_url"] = (
                f"{self.mlflow_uri}/#/experiments/{self.run.experiment_id}/runs/{self.run.run_id}"
            )
        return out | self.outputs


def _new_run_dir(name: str) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir = paths.runs_dir() / f"{name}-{stamp}"
    n = 1
    while run_dir.exists():  # two runs in one second must not share outputs
        n += 1
        run_dir = paths.runs_dir() / f"{name}-{stamp}-{n}"
    run_dir.mkdir(parents=True)
    return run_dir


def as_pipeline(spec: Any, name: str = "job") -> PipelineSpec:
    """A single stage file runs as a one-stage pipeline on the lab model."""
    if isinstance(spec, PipelineSpec):
        return spec
    return PipelineSpec(name=name, stages=[spec])


def run_pipeline(spec: PipelineSpec, mlflow_uri: str | None) -> PipelineResult:
    from loraforge.resolve import resolve_model

    run_dir = _new_run_dir(spec.name)
    parent = start_run(mlflow_uri, spec.mlflow.experiment, spec.name, "pipeline", spec.name) if mlflow_uri else None
    result = PipelineResult(run_dir, mlflow_uri, parent)
    if parent:
        parent.log_params({"model": spec.model, "seed": spec.seed, "stages": ",".join(s.kind for s in spec.stages)})
        parent.log_dict(spec.model_dump(mode="json"), "pipeline_spec.json")
    console.print(f"[bold]pipeline {spec.name}[/] -> {run_dir}")
    status = "FAILED"
    try:
        # Plain curation needs no model: do not build or download one for such a curate-only job.
        needs_model = any(
            s.kind != "curate" or s.scores is not None or s.mods is not None for s in spec.stages
        )
        model = resolve_model(spec.model) if needs_model else spec.model
        state: dict[str, Any] = {}
        for stage in spec.stages:
            run = child_run(parent, stage.kind) if parent else None
            ctx = StageContext(run_dir=run_dir, model=model, run=run, seed=spec.seed, model_ref=spec.model)
            console.rule(f"stage {stage.kind}")
            t0 = time.time()
            stage_status = "FAILED"
            try:
                _run_stage(spec, stage, ctx, state, result)
                stage_status = "FINISHED"
            finally:
                if run:
                    run.log_metrics({"stage_seconds": time.time() - t0})
                    run.finish(stage_status)
            console.print(f"stage {stage.kind} done in {time.time() - t0:.0f}s")
        status = "FINISHED"
    finally:
        if parent:
            parent.finish(status)
    return result


def _run_stage(spec: PipelineSpec, stage: Any, ctx: StageContext, state: dict[str, Any], result: PipelineResult):
    if isinstance(stage, CurateSpec):
        from loraforge.data.pipeline import run_curate

        cur = run_curate(stage, ctx)
        state["data"] = str(cur.data_dir)
        result.outputs["curated_data"] = str(cur.output_dir)
        result.outputs["curate_counts"] = {k: cur.manifest.get(k) for k in ("in", "kept", "dropped", "merged")}
    elif isinstance(stage, TuneSpec):
        from loraforge.tune.runner import run_tune

        tuned = run_tune(stage, _train_spec(spec, state), ctx)
        result.outputs["tune_best"] = tuned.best_config
        if stage.apply_best:
            state["best"] = tuned.best_config
    elif isinstance(stage, TrainSpec):
        from loraforge.train.trainer import run_train

        trained = run_train(_train_spec(spec, state), ctx)
        state["adapter"] = trained.adapter_dir
        result.outputs["adapter"] = str(trained.adapter_dir)
        result.outputs["train_final_loss"] = trained.final_loss
    elif isinstance(stage, EvaluateSpec):
        from loraforge.evaluate.runner import run_evaluate

        ev = run_evaluate(stage, ctx, state.get("adapter"))
        result.outputs["eval"] = ev.metrics
    elif isinstance(stage, ServeSpec):
        _serve(stage, ctx, state, result)


def _train_spec(spec: PipelineSpec, state: dict[str, Any]) -> TrainSpec:
    train: TrainSpec = spec.stage("train")
    updates: dict[str, Any] = {}
    if train.data is None and "data" in state:
        updates["data"] = state["data"]
    if train.seed == 0 and spec.seed:
        updates["seed"] = spec.seed
    curate = spec.stage("curate")
    if curate is not None and curate.mixture.curriculum is not None and "data_order" not in train.model_fields_set:
        updates["data_order"] = "as_written"  # a curated curriculum is trained in its order unless told otherwise
    if "best" in state:
        best = state["best"]
        updates["learning_rate"] = best["learning_rate"]
        updates["lora"] = train.lora.model_copy(update={"r": best["r"], "alpha": best["alpha"]})
    return train.model_copy(update=updates)


def _serve(stage: ServeSpec, ctx: StageContext, state: dict[str, Any], result: PipelineResult) -> None:
    from loraforge.serve.deployment import run_smoke, serve_forever, start_service

    if not stage.adapters and "adapter" in state:
        stage = stage.model_copy(update={"adapters": [AdapterRef(name="adapter", path=str(state["adapter"]))]})
    if stage.keep_alive:
        serve_forever(stage, ctx)
        return
    handle = start_service(stage, ctx)
    result.outputs["serve_url"] = handle.url
    try:
        answers = run_smoke(handle, stage)
        result.outputs["smoke_answers"] = [
            {"prompt": p, "model": m, "answer": a} for p, m, a in answers
        ]
        for p, m, a in answers:
            console.print(f"[cyan]{m}[/] {p!r} -> {a!r}")
        if ctx.run:
            ctx.run.log_dict(result.outputs["smoke_answers"], "serve/smoke_answers.json")
    finally:
        handle.shutdown()
