"""The dashboard against a real MLflow server: data access, the Streamlit app (AppTest), a real browser."""

from __future__ import annotations

import socket
import uuid
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
import streamlit as st
from streamlit import dataframe_util
from streamlit.testing.v1 import AppTest

from loraforge import dashboard_data as data
from loraforge.cluster import free_port
from loraforge.dashboard_launch import APP_PATH, launch, start_dashboard
from loraforge.errors import ClusterError
from loraforge.tracking import RunRef, child_run, start_run

CHROMIUM = Path("/usr/bin/chromium")
TRAIN_LOSS = [2.5, 2.0, 1.6, 1.3, 1.1]
TRIAL_LOSS = [2.6, 2.2, 1.9]
EVAL_METRICS = {
    "before.accuracy.arith": 0.25,
    "after.accuracy.arith": 0.75,
    "before.accuracy.capitals": 0.5,
    "after.accuracy.capitals": 0.625,
    "before.perplexity": 10.0,
    "after.perplexity": 10.75,
    "forgetting.perplexity_delta": 0.75,
}


@dataclass
class LoggedPipeline:
    name: str
    pipeline: RunRef
    stages: dict[str, RunRef]


def log_pipeline(uri: str) -> LoggedPipeline:
    """A pipeline run laid out exactly as the pipeline driver does: curate, tune (+ trial), train, evaluate."""
    name = f"dash-{uuid.uuid4().hex[:6]}"
    parent = start_run(uri, "dashboard-test", name, "pipeline", name)
    curate = child_run(parent, "curate")
    curate.log_metrics({"rows.in": 100, "rows.kept": 90, "rows.dropped": 10})
    curate.finish()
    tune = child_run(parent, "tune")
    trial = child_run(tune, "trial", run_name="trial-0")
    for step, loss in enumerate(TRIAL_LOSS):
        trial.log_metrics({"loss": loss}, step=step)
    trial.finish()
    tune.finish()
    train = child_run(parent, "train")
    for step, loss in enumerate(TRAIN_LOSS):
        train.log_metrics({"loss": loss, "learning_rate": 1e-3}, step=step)
    train.finish()
    evaluate = child_run(parent, "evaluate")
    evaluate.log_metrics(EVAL_METRICS)
    evaluate.finish()
    parent.finish()
    return LoggedPipeline(name, parent, {"curate": curate, "tune": tune, "trial": trial, "train": train,
                                         "evaluate": evaluate})


@pytest.fixture(scope="module")
def logged(mlflow_server) -> LoggedPipeline:
    return log_pipeline(mlflow_server)


@pytest.fixture(autouse=True)
def fresh_cache():
    st.cache_data.clear()
    yield
    st.cache_data.clear()


def unused_uri() -> str:
    return f"http://127.0.0.1:{free_port()}"


# -- data access ------------------------------------------------------------------------------------


def test_data_lists_pipeline_and_its_stages(mlflow_server, logged):
    pipelines = data.list_pipeline_runs(mlflow_server)
    mine = [r for r in pipelines if r.run_id == logged.pipeline.run_id]
    assert len(mine) == 1 and mine[0].name == logged.name and mine[0].status == "FINISHED"
    assert all(r.stage == "pipeline" for r in pipelines)  # stage runs are not listed as pipelines

    stages = data.child_runs(mlflow_server, logged.pipeline.run_id)
    assert [r.stage for r in stages] == ["curate", "tune", "trial", "train", "evaluate"]
    trial = next(r for r in stages if r.stage == "trial")
    assert trial.parent_run_id == logged.stages["tune"].run_id
    direct = data.child_runs(mlflow_server, logged.pipeline.run_id, recursive=False)
    assert "trial" not in {r.stage for r in direct}


def test_data_loss_and_before_after(mlflow_server, logged):
    hist = data.loss_history(mlflow_server, logged.stages["train"].run_id)
    assert hist["step"].tolist() == list(range(len(TRAIN_LOSS)))
    assert hist["value"].tolist() == pytest.approx(TRAIN_LOSS)

    table = data.evaluation_table(mlflow_server, logged.stages["evaluate"].run_id).set_index("task")
    assert table.loc["arith", ["before", "after", "delta"]].tolist() == pytest.approx([0.25, 0.75, 0.5])
    assert table.loc["capitals", "delta"] == pytest.approx(0.125)
    assert table.loc["general", "metric"] == "perplexity"
    assert table.loc["general", ["before", "after", "delta"]].tolist() == pytest.approx([10.0, 10.75, 0.75])


def test_before_after_without_logged_forgetting_metric():
    metrics = {"before.accuracy.add": 0.5, "after.accuracy.add": 0.25, "before.perplexity": 8.0,
               "after.perplexity": 7.5, "after.accuracy.sort3": 0.9}
    table = data.before_after_table(metrics).set_index("task")
    assert table.loc["add", "delta"] == pytest.approx(-0.25)
    assert table.loc["general", "delta"] == pytest.approx(-0.5)  # computed: after - before
    assert pd.isna(table.loc["sort3", "before"]) and pd.isna(table.loc["sort3", "delta"])
    assert data.forgetting_delta(metrics) == pytest.approx(-0.5)
    assert data.before_after_table({"loss": 1.0}).empty


def test_data_unreachable_names_uri():
    uri = unused_uri()
    with pytest.raises(ClusterError, match=uri):
        data.list_pipeline_runs(uri)


# -- the Streamlit app (AppTest) --------------------------------------------------------------------


def run_app(monkeypatch, uri: str) -> AppTest:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    at = AppTest.from_file(str(APP_PATH), default_timeout=60)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def chart_data(at: AppTest, index: int) -> pd.DataFrame:
    """The data frame behind the index-th Vega-Lite chart (st.line_chart / st.bar_chart) on the page."""
    charts = at.get("vega_lite_chart")
    return dataframe_util.convert_arrow_bytes_to_pandas_df(charts[index].proto.datasets[0].data.data)


def test_app_shows_pipeline_stages_loss_and_eval(monkeypatch, mlflow_server, logged):
    at = run_app(monkeypatch, mlflow_server)
    pipelines = at.dataframe[0].value  # tables in page order: pipelines, stages, before/after
    assert logged.name in pipelines["name"].tolist()

    at.selectbox(key="pipeline_run").select(logged.pipeline.run_id).run()
    assert not at.exception and not at.error
    assert at.header[0].value == logged.name

    stages = at.dataframe[1].value
    assert stages["stage"].tolist() == ["curate", "tune", "trial", "train", "evaluate"]
    assert set(stages["status"]) == {"FINISHED"}

    assert len(at.get("vega_lite_chart")) == 3  # train loss, tune-trial loss, accuracy bars
    train_curve = chart_data(at, 0).set_index("step")
    assert train_curve["train"].tolist() == pytest.approx(TRAIN_LOSS)
    assert train_curve.index.tolist() == list(range(len(TRAIN_LOSS)))
    assert chart_data(at, 1).set_index("step")["trial-0"].tolist() == pytest.approx(TRIAL_LOSS)
    bars = chart_data(at, 2)
    assert len(bars) == 4 and sorted(bars.iloc[:, -1].tolist()) == pytest.approx([0.25, 0.5, 0.625, 0.75])

    table = at.dataframe[2].value.set_index("task")
    assert table.loc["arith", "before"] == pytest.approx(0.25)
    assert table.loc["arith", "after"] == pytest.approx(0.75)
    assert table.loc["capitals", "delta"] == pytest.approx(0.125)
    assert table.loc["general", ["before", "after", "delta"]].tolist() == pytest.approx([10.0, 10.75, 0.75])
    forgetting = at.metric[0]
    assert "Forgetting" in forgetting.label
    assert forgetting.value == "10.750" and forgetting.delta == "+0.750"


def test_app_unreachable_uri_shows_error(monkeypatch):
    uri = unused_uri()
    at = run_app(monkeypatch, uri)
    assert len(at.error) == 1 and uri in at.error[0].value
    assert not at.dataframe and not at.selectbox


def test_app_without_pipeline_runs_says_so(monkeypatch, tmp_path):
    uri = f"sqlite:///{tmp_path / 'empty.db'}"  # a real, empty tracking store
    at = run_app(monkeypatch, uri)
    assert not at.error
    assert any("No pipeline runs" in i.value for i in at.info)


# -- launcher and a real browser --------------------------------------------------------------------


def test_launch_refuses_busy_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        with pytest.raises(ClusterError, match=f"port {port}"):
            launch(port, "http://127.0.0.1:1")


def test_browser_renders_pipeline_run(mlflow_server, tmp_path):
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: install Debian's chromium (`apt-get install -y chromium`)")
    logged = log_pipeline(mlflow_server)  # the newest pipeline run, so the app selects it by default
    from playwright.sync_api import sync_playwright

    dash = start_dashboard(free_port(), mlflow_server, log_path=tmp_path / "streamlit.log")
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(
                executable_path=str(CHROMIUM),
                args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"],
            )
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 1000})
                page.goto(dash.url, wait_until="domcontentloaded", timeout=60_000)
                page.get_by_text(logged.name).first.wait_for(timeout=60_000)
                shot = tmp_path / "dashboard.png"
                page.screenshot(path=str(shot), full_page=True)
                evaluation = page.get_by_text("Before / after fine-tuning")
                evaluation.wait_for(timeout=60_000)
                evaluation.scroll_into_view_if_needed()
                page.get_by_text("Forgetting: perplexity drift").wait_for(timeout=30_000)
                # train loss, trial loss and accuracy bars all drawn by the browser
                page.wait_for_function(
                    "document.querySelectorAll('[data-testid=\"stVegaLiteChart\"]').length >= 3",
                    timeout=30_000,
                )
                page.get_by_text("Before / after fine-tuning").scroll_into_view_if_needed()
                page.screenshot(path=str(tmp_path / "dashboard_evaluation.png"))
            finally:
                browser.close()
    finally:
        dash.stop()
    assert dash.process.poll() is not None
    assert shot.stat().st_size > 10_000  # a rendered page, not a blank one
