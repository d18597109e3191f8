"""The tune stage: Ray Tune runs trials, each trial builds and fits its own TorchTrainer (Train V2).

How a trial's losses reach Tune: `_TrialReport` (a `TuneReportCallback`) runs in the trial's Train
controller and forwards every rank-0 `ray.train.report`, with or without a checkpoint, as one Tune
result. ASHA reads `loss` at `step`.

How ASHA stops a trial: Tune calls the trial actor's `cleanup()` and then ends the actor. Ending it
abruptly would take its Train controller with it (the controller is owned by the trial actor) and
leave the run's placement group reserved: Train's own cleaner needs the Ray dashboard's state API,
which local clusters here run without. So `cleanup()` raises a stop flag, the controller's callback
sees it at the next report and aborts its run the proper way (workers stopped, placement group
removed), and only then does the trial actor go.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import tempfile
import threading
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from loraforge.context import StageContext
from loraforge.errors import DataError
from loraforge.resolve import resolve_data
from loraforge.spec import TrainSpec, TuneSpec
from loraforge.tracking import RunRef, child_run
from loraforge.tune.search import (
    TUNED_KEYS,
    Choice,
    Continuous,
    Dimension,
    TrialRecord,
    best_trial,
    check_tune_spec,
    search_dimensions,
    trial_train_spec,
)

log = logging.getLogger(__name__)

RUN_ID_KEY = "mlflow_run_id"  # added to every result a trial reports, so the stage can find its run
TRIAL_TAG = "loraforge.trial"
TRIAL_STATUS_TAG = "loraforge.trial_status"  # completed | stopped_early | failed
CLOSED_BY_TAG = "loraforge.closed_by"  # set when the stage, not the trial itself, had to finish a trial run
STOP_TIMEOUT_S = 120.0  # how long a stopped trial waits for its Train run to abort

# Per trial actor process: trial id -> set once the trial function has returned.
_TRIAL_DONE: dict[str, threading.Event] = {}


@dataclass
class TuneResult:
    best_config: dict[str, Any]  # {r, alpha, learning_rate}
    best_loss: float
    trials: list[dict[str, Any]]  # TrialRecord fields: config, last_loss, steps_run, stopped_early, ...
    experiment_dir: str = ""  # Ray Tune's folder for this search
    best_adapter_dir: str | None = None  # the best trial's adapter, when it ran to max_steps


def trial_index(trial_id: str) -> int | None:
    """Tune numbers trials `<uuid>_00000`, `<uuid>_00001`, ... in the order they are created."""
    suffix = trial_id.rsplit("_", 1)[-1]
    return int(suffix) if suffix.isdigit() else None


def _trial_label(trial_id: str) -> str:
    index = trial_index(trial_id)
    return f"trial-{index if index is not None else trial_id}"


def _trial_dirname(trial: Any) -> str:
    return f"{_trial_label(trial.trial_id)}-{trial.trial_id}"


def _index_from_dirname(name: str) -> int | None:
    parts = name.split("-")
    return int(parts[1]) if len(parts) >= 3 and parts[0] == "trial" and parts[1].isdigit() else None


def _stop_flag(trial_id: str) -> Path:
    # The Train controller runs on the trial driver's node, so a local file reaches it.
    return Path(tempfile.gettempdir()) / "loraforge-tune" / f"{trial_id}.stop"


def _tune_domains(dims: dict[str, Dimension]) -> dict[str, Any]:
    from ray import tune

    space: dict[str, Any] = {}
    for key, dim in dims.items():
        if isinstance(dim, Choice):
            space[key] = tune.choice(list(dim.values))
        elif isinstance(dim, Continuous):
            space[key] = (tune.loguniform if dim.log else tune.uniform)(dim.low, dim.high)
        else:  # pragma: no cover - Dimension is a closed union
            raise TypeError(f"unknown search dimension {dim!r}")
    return space


def _report_callback(run_id: str | None, stop_flag: Path):
    """TuneReportCallback that names the trial's MLflow run, keeps NaN from ASHA and obeys the stop flag."""
    from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY, TuneReportCallback
    from ray.util.queue import Full

    class _TrialReport(TuneReportCallback):
        def __init__(self) -> None:
            super().__init__()
            self._aborting = False

        def _abort_if_stopped(self) -> bool:
            if not stop_flag.exists():
                return False
            if not self._aborting:
                import ray

                self._aborting = True
                # Runs in the Train controller: abort() stops the workers and frees the placement group.
                ray.get_runtime_context().current_actor.abort.remote()
            return True

        def after_report(self, run_context, metrics, checkpoint):
            if self._abort_if_stopped():
                return
            result = dict(metrics[0])
            loss = result.get("loss")
            # ASHA never stops a NaN trial (NaN compares false to every cutoff); +inf it does stop.
            if isinstance(loss, float) and math.isnan(loss):
                result["loss"] = math.inf
            if run_id:
                result[RUN_ID_KEY] = run_id
            if checkpoint:
                result[CHECKPOINT_PATH_KEY] = checkpoint.path
            # The queue holds one result; once Tune stops a trial nobody drains it, so never block
            # for good: look at the stop flag between tries.
            while True:
                try:
                    self._training_actor_item_queue.put(result, block=True, timeout=0.5)
                    return
                except Full:
                    if self._abort_if_stopped():
                        return

    return _TrialReport()


def _run_trial(
    config: dict[str, Any], *, tune_spec: TuneSpec, train_spec: TrainSpec, ctx: StageContext, stage_dir: str
) -> None:
    """One Tune trial: a child MLflow run, then a whole Ray Train run with the sampled config."""
    from ray import tune

    from loraforge.train.trainer import build_trainer

    trial_id = tune.get_context().get_trial_id()
    done = _TRIAL_DONE.setdefault(trial_id, threading.Event())
    stop_flag = _stop_flag(trial_id)
    stop_flag.parent.mkdir(parents=True, exist_ok=True)
    stop_flag.unlink(missing_ok=True)
    label = _trial_label(trial_id)
    run: RunRef | None = None
    try:
        spec = trial_train_spec(train_spec, tune_spec, config, output=str(Path(stage_dir) / "adapters" / label))
        if ctx.run is not None:
            run = child_run(ctx.run, "trial", run_name=label,
                            **{TRIAL_TAG: str(trial_index(trial_id)), "loraforge.trial_id": trial_id})
            run.log_params({
                "r": spec.lora.r, "alpha": spec.lora.alpha, "learning_rate": spec.learning_rate,
                "max_steps": spec.max_steps, "num_workers": spec.num_workers,
                "batch_size": spec.batch_size, "strategy": spec.strategy, "seed": spec.seed,
            })
        trainer = build_trainer(
            spec,
            dataclasses.replace(ctx, run=run),
            # The trial id keeps names unique: Train V2 resumes a run it finds stored under the same name.
            name=f"{label}-{trial_id}",
            storage_path=Path(stage_dir) / "trials",
            callbacks=[_report_callback(run.run_id if run else None, stop_flag)],
        )
        try:
            trainer.fit()
        except Exception:
            if not stop_flag.exists():
                raise
            # ASHA stopped the trial and the callback aborted the Train run: an expected ending.
            if run is not None:
                run.set_tags({TRIAL_STATUS_TAG: "stopped_early"})
                run.finish()
            return
        if run is not None:
            run.set_tags({TRIAL_STATUS_TAG: "stopped_early" if stop_flag.exists() else "completed"})
            run.finish()
    except BaseException:
        if run is not None:
            run.set_tags({TRIAL_STATUS_TAG: "failed"})
            run.finish("FAILED")
        raise
    finally:
        stop_flag.unlink(missing_ok=True)
        done.set()


def _stop_running_trial(trial_id: str) -> None:
    """Called in the trial actor as Tune stops it: let the Train run abort before the actor goes."""
    done = _TRIAL_DONE.get(trial_id)
    if done is None or done.is_set():
        return
    flag = _stop_flag(trial_id)
    flag.parent.mkdir(parents=True, exist_ok=True)
    flag.write_text(str(time.time()))
    if not done.wait(STOP_TIMEOUT_S):
        log.warning("trial %s: its Train run did not abort within %.0fs", trial_id, STOP_TIMEOUT_S)


def _trainable(tune_spec: TuneSpec, train_spec: TrainSpec, ctx: StageContext, stage_dir: Path) -> type:
    from ray.tune.trainable.function_trainable import wrap_function

    base = wrap_function(
        partial(_run_trial, tune_spec=tune_spec, train_spec=train_spec, ctx=ctx, stage_dir=str(stage_dir)),
        name="lora_trial",
    )

    class LoraTrial(base):  # type: ignore[misc, valid-type]
        def cleanup(self) -> None:
            _stop_running_trial(self.trial_id)
            super().cleanup()

    return LoraTrial


def _record(result: Any, fallback_index: int, max_steps: int) -> TrialRecord:
    metrics = dict(result.metrics or {})
    # Trial folders are named by `_trial_dirname`, so a trial that died before reporting keeps its number.
    index = _index_from_dirname(Path(result.path).name) if result.path else None
    history: list[tuple[int, float | None]] = []
    df = result.metrics_dataframe
    if df is not None and "loss" in df and "step" in df:
        history = [
            (int(s), float(x) if math.isfinite(x) else None)  # None keeps trials.json valid JSON
            for s, x in zip(df["step"], df["loss"], strict=True) if s == s
        ]
    loss = metrics.get("loss")
    last_loss = float(loss) if isinstance(loss, int | float) and math.isfinite(loss) else None
    steps = int(metrics.get("step", 0) or 0)
    error = None if result.error is None else f"{type(result.error).__name__}: {result.error}"[:2000]
    raw = result.config or {}
    config = (
        {"r": int(raw["r"]), "alpha": float(raw["alpha"]), "learning_rate": float(raw["learning_rate"])}
        if all(k in raw for k in TUNED_KEYS) else dict(raw)
    )
    return TrialRecord(
        trial=index if index is not None else fallback_index,
        config=config,
        last_loss=last_loss,
        steps_run=steps,
        stopped_early=error is None and steps < max_steps,
        error=error,
        run_id=metrics.get(RUN_ID_KEY),
        loss_history=history,
    )


def _complete_trial_run(ctx_run: RunRef, rec: TrialRecord) -> None:
    """Make each trial run whole: the loss steps Tune saw but the train loop had not flushed to MLflow
    before an abort, its final status, and a finish if the trial never got to close it."""
    if rec.run_id is None:
        return
    from mlflow.entities import Metric

    run = RunRef(ctx_run.tracking_uri, rec.run_id, ctx_run.experiment_id)
    client = run.client()
    logged = {m.step for m in client.get_metric_history(rec.run_id, "loss")}
    now = int(time.time() * 1000)
    missing = [Metric("loss", loss, now, step) for step, loss in rec.loss_history
               if step not in logged and loss is not None]
    if missing:
        client.log_batch(rec.run_id, metrics=missing)
    # The status follows the record's rule (steps run vs max_steps), also for a trial that closed its own run:
    # ASHA may stop a trial at its last report, after the trial ran every step; that trial completed.
    status = "failed" if rec.error else "stopped_early" if rec.stopped_early else "completed"
    run.set_tags({"loraforge.steps_run": rec.steps_run, TRIAL_STATUS_TAG: status})
    if client.get_run(rec.run_id).info.status == "RUNNING":  # the trial ended without closing it
        run.set_tags({CLOSED_BY_TAG: "tune"})
        run.finish("FAILED" if rec.error else "FINISHED")


def run_tune(tune_spec: TuneSpec, train_spec: TrainSpec, ctx: StageContext) -> TuneResult:
    """Search r, alpha and learning rate with ASHA; log the best config and every trial to MLflow."""
    check_tune_spec(tune_spec, train_spec)
    # Fail before any trial starts: every trial would hit the same missing file.
    if train_spec.data is None:
        raise DataError("tune: the train stage needs `data:` (or a curate stage before it)")
    resolve_data(train_spec.data)

    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    stage_dir = ctx.stage_dir("tune").resolve()
    tuner = tune.Tuner(
        # The trial only drives its Train run; its workers hold the real CPUs. A fraction lets
        # trial drivers fit beside their workers on a small cluster.
        tune.with_resources(_trainable(tune_spec, train_spec, ctx, stage_dir), {"cpu": tune_spec.driver_cpus}),
        param_space=_tune_domains(search_dimensions(tune_spec.search)),
        tune_config=tune.TuneConfig(
            metric=tune_spec.metric,
            mode="min",
            scheduler=ASHAScheduler(
                time_attr="step",  # the train loop's own step counter
                max_t=tune_spec.max_steps,
                grace_period=tune_spec.grace_period,
                reduction_factor=tune_spec.reduction_factor,
                # A trial at max_steps finishes on its own (adapter saved, run closed), not by a stop.
                stop_last_trials=False,
            ),
            # Seeded sampling. The concurrency limit goes here: Tune ignores TuneConfig's
            # max_concurrent_trials when a search algorithm object is passed.
            search_alg=BasicVariantGenerator(random_state=ctx.seed, max_concurrent=tune_spec.max_concurrent),
            num_samples=tune_spec.num_samples,
            trial_dirname_creator=_trial_dirname,
        ),
        run_config=tune.RunConfig(name="search", storage_path=str(stage_dir), verbose=1),
    )
    grid = tuner.fit()

    records = sorted(
        (_record(grid[i], i, tune_spec.max_steps) for i in range(len(grid))), key=lambda r: r.trial
    )
    if ctx.run is not None:
        for rec in records:
            _complete_trial_run(ctx.run, rec)
    trials = [dataclasses.asdict(r) for r in records]
    (stage_dir / "trials.json").write_text(json.dumps(trials, indent=2))
    if ctx.run is not None:
        ctx.run.log_dict(trials, "tune/trials.json")
    best = best_trial(records)  # raises if no trial reported a finite loss
    assert best.last_loss is not None

    if ctx.run is not None:
        ctx.run.log_params({f"best.{k}": v for k, v in best.config.items()})
        ctx.run.log_metrics({"best_loss": best.last_loss})
        ctx.run.set_tags({
            "loraforge.best_trial": best.trial,
            "loraforge.best_trial_run": best.run_id or "",
            "loraforge.trials_stopped_early": sum(r.stopped_early for r in records),
        })
    log.info("tune: best trial %s %s loss %.4f", best.trial, best.config, best.last_loss)
    adapter = stage_dir / "adapters" / f"trial-{best.trial}"
    return TuneResult(
        best_config=dict(best.config),
        best_loss=best.last_loss,
        trials=trials,
        experiment_dir=str(grid.experiment_path),
        best_adapter_dir=str(adapter) if adapter.is_dir() else None,
    )
