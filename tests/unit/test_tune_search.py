"""The pure half of the tune stage: no Ray is imported here."""

from __future__ import annotations

import subprocess
import sys

import pytest

from loraforge.errors import LoraforgeError, SpecError
from loraforge.spec import LoraSpec, Range, SearchSpace, TrainSpec, TuneSpec
from loraforge.tune.search import (
    Choice,
    Continuous,
    TrialRecord,
    best_trial,
    check_tune_spec,
    search_dimensions,
    trial_train_spec,
    with_best_config,
)

TRAIN = TrainSpec(
    data="lab://tasks/x_train.jsonl",
    lora=LoraSpec(r=8, alpha=16.0, dropout=0.1, target_modules=["q_proj", "v_proj"]),
    strategy="fsdp",
    num_workers=2,
    max_steps=200,
    batch_size=4,
    learning_rate=1e-3,
    warmup_steps=3,
    checkpoint_every=20,
    seed=7,
)


def test_module_does_not_pull_in_ray():
    # A fresh interpreter: integration modules in the same pytest session may have imported Ray already.
    code = "import sys, loraforge.tune.search; sys.exit('ray' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_dimensions_follow_the_search_space():
    space = SearchSpace(r=[4, 8, 4], alpha=[8.0, 32.0], learning_rate=Range(low=1e-4, high=1e-2, log=True))
    dims = search_dimensions(space)
    assert dims["r"] == Choice((4, 8))  # the repeated 4 would otherwise be sampled twice as often
    assert dims["alpha"] == Choice((8.0, 32.0))
    assert dims["learning_rate"] == Continuous(1e-4, 1e-2, log=True)
    linear = search_dimensions(SearchSpace(learning_rate=Range(low=0.001, high=0.002, log=False)))
    assert linear["learning_rate"] == Continuous(0.001, 0.002, log=False)


def test_trial_spec_sets_tuned_fields_and_budget():
    tune = TuneSpec(max_steps=12, workers_per_trial=1)
    spec = trial_train_spec(TRAIN, tune, {"r": 16, "alpha": 32, "learning_rate": 3e-3}, output="/t/3")
    assert (spec.lora.r, spec.lora.alpha, spec.learning_rate) == (16, 32.0, 3e-3)
    assert (spec.max_steps, spec.num_workers, spec.checkpoint_every) == (12, 1, 12)
    assert spec.output == "/t/3"  # a trial never writes into the train stage's adapter folder
    assert isinstance(spec.lora.alpha, float)


def test_trial_spec_leaves_everything_else_alone():
    spec = trial_train_spec(TRAIN, TuneSpec(max_steps=12), {"r": 4, "alpha": 8.0, "learning_rate": 1e-4},
                            output="/t/0")
    changed = {"lora", "learning_rate", "max_steps", "num_workers", "checkpoint_every", "output"}
    before, after = TRAIN.model_dump(), spec.model_dump()
    assert {k: v for k, v in before.items() if k not in changed} == {
        k: v for k, v in after.items() if k not in changed
    }
    assert after["lora"]["dropout"] == 0.1 and after["lora"]["target_modules"] == ["q_proj", "v_proj"]
    assert TRAIN.lora.r == 8 and TRAIN.max_steps == 200  # the input spec is not mutated


def test_trial_spec_accepts_numpy_like_scalars():
    class Int:  # what a numpy scalar offers: __int__/__float__, not an int subclass
        def __init__(self, v):
            self.v = v

        def __int__(self):
            return int(self.v)

        def __float__(self):
            return float(self.v)

    spec = trial_train_spec(TRAIN, TuneSpec(), {"r": Int(4), "alpha": Int(8), "learning_rate": 0.01}, output="o")
    assert type(spec.lora.r) is int and spec.lora.r == 4


def test_trial_spec_rejects_bad_config():
    with pytest.raises(LoraforgeError, match="missing"):
        trial_train_spec(TRAIN, TuneSpec(), {"r": 4, "alpha": 8.0}, output="o")
    with pytest.raises(SpecError) as err:
        trial_train_spec(TRAIN, TuneSpec(), {"r": 0, "alpha": 8.0, "learning_rate": 1e-3}, output="o")
    assert any(path == "lora.r" for path, _ in err.value.problems)


def test_check_accepts_defaults():
    check_tune_spec(TuneSpec(), TrainSpec())


@pytest.mark.parametrize(
    ("tune", "field"),
    [
        (TuneSpec(workers_per_trial=0), "workers_per_trial"),
        (TuneSpec(max_steps=5, grace_period=6), "grace_period"),
        (TuneSpec(workers_per_trial=8), "workers_per_trial"),  # TRAIN.batch_size is 4
        (TuneSpec(search=SearchSpace(r=[4, 0])), "search.r.1"),
        (TuneSpec(search=SearchSpace(r=[2000])), "search.r.0"),
        (TuneSpec(search=SearchSpace(learning_rate=Range(low=-1.0, high=0.1, log=False))),
         "search.learning_rate.low"),
    ],
)
def test_check_rejects_invalid_combinations(tune, field):
    with pytest.raises(SpecError) as err:
        check_tune_spec(tune, TRAIN)
    assert field in [path for path, _ in err.value.problems], err.value.problems


def test_with_best_config_keeps_the_train_budget():
    spec = with_best_config(TRAIN, {"r": 16, "alpha": 8.0, "learning_rate": 5e-4})
    assert (spec.lora.r, spec.lora.alpha, spec.learning_rate) == (16, 8.0, 5e-4)
    assert (spec.max_steps, spec.num_workers, spec.checkpoint_every) == (200, 2, 20)


def _rec(i, loss, steps=8, error=None):
    return TrialRecord(trial=i, config={"r": 4, "alpha": 8.0, "learning_rate": 1e-3}, last_loss=loss,
                       steps_run=steps, stopped_early=steps < 8, error=error)


def test_best_is_lowest_last_loss():
    trials = [_rec(0, 2.5), _rec(1, 1.25), _rec(2, 3.0, steps=2), _rec(3, 1.5)]
    assert best_trial(trials).trial == 1


def test_best_skips_errors_and_non_finite_losses():
    trials = [_rec(0, 0.1, error="boom"), _rec(1, float("nan")), _rec(2, None), _rec(3, float("inf")), _rec(4, 9.0)]
    assert best_trial(trials).trial == 4


def test_best_ties_are_deterministic():
    trials = [_rec(3, 1.0, steps=4), _rec(2, 1.0), _rec(1, 1.0)]
    assert best_trial(trials).trial == 1  # most steps first, then the lower trial number
    assert best_trial(list(reversed(trials))).trial == 1


def test_best_without_any_usable_trial_names_the_error():
    with pytest.raises(LoraforgeError, match="trial 0: out of memory"):
        best_trial([_rec(0, None, error="out of memory"), _rec(1, float("nan"))])
