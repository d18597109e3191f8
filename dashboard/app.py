"""loraforge dashboard: pipeline runs, their stages, loss curves and what fine-tuning cost, from MLflow only.

Run with `loraforge dashboard` or `streamlit run dashboard/app.py`; the tracking server comes from
MLFLOW_TRACKING_URI (editable in the sidebar).
"""

from __future__ import annotations

import os

import pandas as pd
import streamlit as st

from loraforge import dashboard_data as data
from loraforge.cluster import DEFAULT_MLFLOW_PORT
from loraforge.errors import ClusterError

TTL_S = 10  # short: runs are still logging while people watch

st.set_page_config(page_title="loraforge", layout="wide")


@st.cache_data(ttl=TTL_S, show_spinner=False)
def pipeline_runs(uri: str) -> list[data.RunSummary]:
    return data.list_pipeline_runs(uri)


@st.cache_data(ttl=TTL_S, show_spinner=False)
def stage_runs(uri: str, run_id: str) -> list[data.RunSummary]:
    return data.child_runs(uri, run_id)


@st.cache_data(ttl=TTL_S, show_spinner=False)
def loss_curves(uri: str, runs: list[data.RunSummary]) -> pd.DataFrame:
    return data.loss_curves(uri, runs)


@st.cache_data(ttl=TTL_S, show_spinner=False)
def run_metrics(uri: str, run_id: str) -> dict[str, float]:
    return data.run_metrics(uri, run_id)


def highlight_forgetting(row: pd.Series) -> list[str]:
    """Perplexity drift is the forgetting measure: colour it, red when the model got worse."""
    if row["metric"] != "perplexity" or pd.isna(row["delta"]):
        return [""] * len(row)
    colour = "#f8d7da" if row["delta"] > 0 else "#d4edda"
    return [f"background-color: {colour}; font-weight: bold"] * len(row)


def show_stages(stages: list[data.RunSummary]) -> None:
    st.subheader("Stages")
    if not stages:
        st.info("This pipeline run has no stage runs yet.")
        return
    st.dataframe(data.runs_table(stages).drop(columns=["pipeline"]), hide_index=True)


def show_loss(uri: str, stages: list[data.RunSummary]) -> None:
    st.subheader("Training loss")
    train = [r for r in stages if r.stage == "train"]
    trials = [r for r in stages if r.stage == "trial"]
    curves = loss_curves(uri, train) if train else pd.DataFrame()
    if curves.empty:
        st.info("No train run with a logged `loss` metric yet.")
    else:
        st.line_chart(curves, x_label="step", y_label="loss")
    if trials:
        trial_curves = loss_curves(uri, trials)
        if not trial_curves.empty:
            st.caption(f"Tune trials ({len(trial_curves.columns)})")
            st.line_chart(trial_curves, x_label="step", y_label="loss")


def show_evaluation(uri: str, stages: list[data.RunSummary]) -> None:
    st.subheader("Before / after fine-tuning")
    evals = [r for r in stages if r.stage == "evaluate"]
    if not evals:
        st.info("No evaluate run in this pipeline.")
        return
    run = evals[-1]  # the latest evaluation is the one that describes the final adapter
    metrics = run_metrics(uri, run.run_id)
    table = data.before_after_table(metrics)
    if table.empty:
        st.info(f"Evaluate run `{run.name}` has no before/after metrics yet.")
        return
    delta = data.forgetting_delta(metrics)
    ppl = table[table["metric"] == "perplexity"]
    if delta is not None:
        after = ppl["after"].iloc[0] if not ppl.empty else None
        st.metric(
            "Forgetting: perplexity drift on general text",
            value=f"{after:.3f}" if after is not None and pd.notna(after) else "n/a",
            delta=f"{delta:+.3f}",
            delta_color="inverse",  # higher perplexity after fine-tuning is the bad direction
            help="after.perplexity - before.perplexity (forgetting.perplexity_delta)",
        )
    st.dataframe(
        table.style.apply(highlight_forgetting, axis=1).format(precision=4, na_rep="-"),
        hide_index=True,
    )
    acc = table[table["metric"] == "accuracy"]
    if not acc.empty:
        st.bar_chart(acc, x="task", y=["before", "after"], stack=False, y_label="accuracy")


def main() -> None:
    st.title("loraforge")
    default_uri = os.environ.get("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{DEFAULT_MLFLOW_PORT}")
    uri = st.sidebar.text_input("MLflow tracking URI", value=default_uri, key="tracking_uri").strip()
    if st.sidebar.button("Refresh", key="refresh"):
        st.cache_data.clear()

    try:
        runs = pipeline_runs(uri)
    except ClusterError as err:
        st.error(f"{err}. Start one with `loraforge mlflow`, or set the tracking URI in the sidebar.")
        st.stop()
    except Exception as err:  # any other failure still means "cannot read this MLflow": say where
        st.error(f"Cannot read MLflow at {uri}: {err}")
        st.stop()
    if not runs:
        st.info(f"No pipeline runs in MLflow at {uri} yet. Start one with `loraforge run <job.yaml>`.")
        st.stop()

    st.subheader("Pipeline runs")
    st.dataframe(data.runs_table(runs).drop(columns=["stage"]), hide_index=True)
    by_id = {r.run_id: r for r in runs}
    run_id = st.selectbox(
        "Pipeline run",
        options=list(by_id),
        format_func=lambda rid: f"{by_id[rid].name}  [{by_id[rid].status}]  {rid[:8]}",
        key="pipeline_run",
    )
    if run_id is None:
        st.stop()
    chosen = by_id[run_id]
    st.header(chosen.name)
    try:
        stages = stage_runs(uri, run_id)
    except Exception as err:
        st.error(f"Cannot read the stages of run {run_id} from MLflow at {uri}: {err}")
        st.stop()
    show_stages(stages)
    show_loss(uri, stages)
    show_evaluation(uri, stages)


main()
