"""The pure half of the tune stage: search dimensions, trial specs, and picking the best trial.

Nothing here imports Ray, so all of it is unit-tested without a cluster. `runner.py` turns the
dimensions into Ray Tune domains and feeds trial configs back through `trial_train_spec`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from loraforge.errors import LoraforgeError, SpecError
from loraforge.spec import SearchSpace, TrainSpec, TuneSpec

TUNED_KEYS = ("r", "alpha", "learning_rate")


@dataclass(frozen=True)
class Choice:
    """Pick one of `values`, each equally likely."""

    values: tuple[Any, ...]


@dataclass(frozen=True)
class Continuous:
    """A float between low and high; `log` samples its logarithm uniformly."""

    low: float
    high: float
    log: bool


Dimension = Choice | Continuous


@dataclass
class TrialRecord:
    """What one trial did, as the tune stage reports it (trials.json, TuneResult.trials)."""

    trial: int
    config: dict[str, Any]
    last_loss: float | None  # None: the trial never reported a finite loss
    steps_run: int
    stopped_early: bool
    error: str | None = None
    run_id: str | None = None  # the trial's MLflow child run
    loss_history: list[tuple[int, float | None]] = field(default_factory=list)  # (step, loss) Tune received


def _unique(values: Sequence[Any]) -> tuple[Any, ...]:
    # A repeated candidate would silently get twice the sampling weight.
    return tuple(dict.fromkeys(values))


def search_dimensions(search: SearchSpace) -> dict[str, Dimension]:
    lr = search.learning_rate
    return {
        "r": Choice(_unique(search.r)),
        "alpha": Choice(_unique(search.alpha)),
        "learning_rate": Continuous(lr.low, lr.high, lr.log),
    }


def _spec_problems(err: ValidationError, prefix: str) -> list[tuple[str, str]]:
    return [(prefix + ".".join(str(p) for p in e["loc"]), e["msg"]) for e in err.errors()]


def _build(train_spec: TrainSpec, changes: Mapping[str, Any], source: str) -> TrainSpec:
    """A validated copy of `train_spec` with `changes` (nested dicts merge into nested fields)."""
    data = train_spec.model_dump()
    for key, value in changes.items():
        if isinstance(value, Mapping):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    try:
        return TrainSpec.model_validate(data)
    except ValidationError as err:
        raise SpecError(source, _spec_problems(err, "")) from None


def check_tune_spec(tune_spec: TuneSpec, train_spec: TrainSpec, source: str = "tune") -> None:
    """Refuse combinations that would only fail once trials are running on the cluster."""
    problems: list[tuple[str, str]] = []
    if tune_spec.workers_per_trial < 1:
        problems.append((
            "workers_per_trial",
            "must be >= 1: a trial's losses reach Tune through Ray Train workers "
            "(0, the in-process mode, reports nothing to Tune)",
        ))
    if tune_spec.grace_period > tune_spec.max_steps:
        problems.append((
            "grace_period",
            f"{tune_spec.grace_period} is beyond max_steps ({tune_spec.max_steps}): ASHA could never stop a trial",
        ))
    if train_spec.batch_size < tune_spec.workers_per_trial:
        problems.append((
            "workers_per_trial",
            f"{tune_spec.workers_per_trial} workers cannot split the train stage's global "
            f"batch_size {train_spec.batch_size}",
        ))
    # Every candidate must make a valid TrainSpec; find out now, not in trial 3.
    search = tune_spec.search
    lr = search.learning_rate
    candidates: list[tuple[str, dict[str, Any]]] = [
        *((f"search.r.{i}", {"lora": {"r": r}}) for i, r in enumerate(search.r)),
        *((f"search.alpha.{i}", {"lora": {"alpha": a}}) for i, a in enumerate(search.alpha)),
        ("search.learning_rate.low", {"learning_rate": lr.low}),
        ("search.learning_rate.high", {"learning_rate": lr.high}),
    ]
    for path, change in candidates:
        try:
            _build(train_spec, change, source)
        except SpecError as err:
            problems += [(path, msg) for _, msg in err.problems]
    if problems:
        raise SpecError(source, problems)


def _config_values(config: Mapping[str, Any]) -> dict[str, Any]:
    missing = [k for k in TUNED_KEYS if k not in config]
    if missing:
        raise LoraforgeError(f"a tune config needs {list(TUNED_KEYS)}; missing {missing}")
    # Tune may hand back numpy scalars; specs, MLflow and JSON want plain Python numbers.
    return {"r": int(config["r"]), "alpha": float(config["alpha"]), "learning_rate": float(config["learning_rate"])}


def trial_train_spec(
    train_spec: TrainSpec, tune_spec: TuneSpec, config: Mapping[str, Any], *, output: str
) -> TrainSpec:
    """The TrainSpec one trial fits: the sampled r/alpha/lr, the trial's budget and its own adapter
    folder (never the train stage's), everything else as given."""
    values = _config_values(config)
    return _build(
        train_spec,
        {
            "lora": {"r": values["r"], "alpha": values["alpha"]},
            "learning_rate": values["learning_rate"],
            "max_steps": tune_spec.max_steps,
            "num_workers": tune_spec.workers_per_trial,
            # Trials are thrown away: one checkpoint, at the end, instead of paying for them mid-run.
            "checkpoint_every": tune_spec.max_steps,
            "output": output,
        },
        "tune trial",
    )


def with_best_config(train_spec: TrainSpec, best_config: Mapping[str, Any]) -> TrainSpec:
    """The train stage's spec with the tuned r, alpha and learning rate (its own budget kept)."""
    values = _config_values(best_config)
    return _build(
        train_spec,
        {"lora": {"r": values["r"], "alpha": values["alpha"]}, "learning_rate": values["learning_rate"]},
        "tune best config",
    )


def _finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


def best_trial(trials: Sequence[TrialRecord]) -> TrialRecord:
    """Lowest last loss; ties go to the trial that ran more steps, then to the lower trial number."""
    ranked = [t for t in trials if t.error is None and _finite(t.last_loss)]
    if not ranked:
        errors = [f"trial {t.trial}: {t.error}" for t in trials if t.error]
        detail = f"; first error: {errors[0]}" if errors else ""
        raise LoraforgeError(f"none of {len(trials)} tune trial(s) reported a finite loss{detail}")
    return min(ranked, key=lambda t: (t.last_loss, -t.steps_run, t.trial))
