"""The tune stage on the shared local Ray cluster: ASHA over real Train V2 runs, tracked in real MLflow."""

from __future__ import annotations

import json
import time

import pytest
from mlflow.tracking import MlflowClient

from loraforge.context import StageContext
from loraforge.spec import Range, SearchSpace, TrainSpec, TuneSpec
from loraforge.tracking import PARENT_TAG, STAGE_TAG, start_run
from loraforge.tune.runner import CLOSED_BY_TAG, TRIAL_STATUS_TAG, run_tune

pytestmark = pytest.mark.integration

MAX_STEPS = 8
# Seed 1 draws learning rates 1.8e-2, 1.8e-2, 7.9e-5, 6.8e-5 for trials 0-3 (BasicVariantGenerator is
# seeded). The first two run together and set ASHA's cutoff at step 2; the later two barely move
# from the shared starting loss, so ASHA stops them whatever order the cluster runs things in.
SEARCH_SEED = 1
EXPECTED_LRS = [1.8e-2, 1.8e-2, 7.9e-5, 6.8e-5]


def _live_placement_groups(ray) -> set[str]:
    return {pg_id for pg_id, pg in ray.util.placement_group_table().items() if pg["state"] != "REMOVED"}


def test_asha_search_over_train_runs(ray_cluster, mlflow_server, lab, tmp_path):
    ray = ray_cluster
    tune_spec = TuneSpec(
        search=SearchSpace(r=[4, 8], alpha=[8.0, 16.0], learning_rate=Range(low=1e-6, high=3e-2, log=True)),
        num_samples=4,
        max_steps=MAX_STEPS,
        grace_period=2,
        reduction_factor=2,
        max_concurrent=2,
        workers_per_trial=1,
    )
    train_spec = TrainSpec(
        data=f"lab://tasks/{lab.tasks[0]}_train.jsonl", batch_size=4, max_seq_len=128, max_steps=500,
        num_workers=2, checkpoint_every=5,
    )
    tune_run = start_run(mlflow_server, "test-tune", "tune", "tune", "tune-test")
    ctx = StageContext(run_dir=tmp_path, model=str(lab.model_dir), run=tune_run, seed=SEARCH_SEED)
    pgs_before = _live_placement_groups(ray)

    t0 = time.time()
    result = run_tune(tune_spec, train_spec, ctx)
    elapsed = time.time() - t0
    tune_run.finish()

    trials = result.trials
    assert [t["trial"] for t in trials] == [0, 1, 2, 3]
    assert [t["error"] for t in trials] == [None] * 4
    assert [t["config"]["learning_rate"] for t in trials] == pytest.approx(EXPECTED_LRS, rel=0.05)
    losses = [t["last_loss"] for t in trials]
    assert all(isinstance(x, float) for x in losses), losses
    assert result.best_loss == min(losses)
    best = trials[losses.index(min(losses))]
    assert result.best_config == best["config"] and set(result.best_config) == {"r", "alpha", "learning_rate"}
    stopped = [t for t in trials if t["stopped_early"]]
    assert stopped, f"ASHA stopped no trial: {[(t['config'], t['steps_run']) for t in trials]}"
    assert all(t["steps_run"] < MAX_STEPS for t in stopped)
    assert all(t["steps_run"] == MAX_STEPS for t in trials if not t["stopped_early"])
    assert {2, 3} <= {t["trial"] for t in stopped}  # the low learning rates
    assert best["trial"] in (0, 1) and not best["stopped_early"]
    assert (tmp_path / "tune" / "trials.json").is_file()
    assert (tmp_path / "tune" / "adapters" / f"trial-{best['trial']}").is_dir()
    assert not (tmp_path / "train").exists()  # trials never write into the train stage's folder

    # A stopped trial aborts its Train run: nothing keeps the cluster's CPUs reserved afterwards.
    deadline = time.time() + 30
    while _live_placement_groups(ray) - pgs_before and time.time() < deadline:
        time.sleep(1)
    assert not _live_placement_groups(ray) - pgs_before

    client = MlflowClient(mlflow_server)
    tune_data = client.get_run(tune_run.run_id).data
    assert tune_data.params["best.r"] == str(result.best_config["r"])
    assert float(tune_data.params["best.learning_rate"]) == pytest.approx(result.best_config["learning_rate"])
    assert tune_data.metrics["best_loss"] == pytest.approx(result.best_loss)
    artifacts = [a.path for a in client.list_artifacts(tune_run.run_id, "tune")]
    assert artifacts == ["tune/trials.json"]
    logged = json.loads(
        open(client.download_artifacts(tune_run.run_id, "tune/trials.json", str(tmp_path / "dl"))).read()
    )
    assert [t["last_loss"] for t in logged] == losses

    children = client.search_runs(
        [tune_run.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{tune_run.run_id}'"
    )
    assert len(children) == 4
    by_name = {r.info.run_name: r for r in children}
    assert set(by_name) == {f"trial-{i}" for i in range(4)}
    for t in trials:
        run = by_name[f"trial-{t['trial']}"]
        assert run.data.tags[STAGE_TAG] == "trial"
        assert run.info.status == "FINISHED"
        assert CLOSED_BY_TAG not in run.data.tags  # each trial, stopped or not, closed its own run
        assert run.data.tags[TRIAL_STATUS_TAG] == ("stopped_early" if t["stopped_early"] else "completed")
        assert int(run.data.params["r"]) == t["config"]["r"]
        history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss"))
        steps = [s for s, _ in history]
        assert steps[: t["steps_run"]] == list(range(1, t["steps_run"] + 1)), steps
        assert dict(history)[t["steps_run"]] == pytest.approx(t["last_loss"])
    print(f"tune: 4 trials in {elapsed:.0f}s, best {result.best_config} loss {result.best_loss:.4f}, "
          f"stopped early: {[t['trial'] for t in stopped]}")
