"""One job file from lab data to a served adapter, on the shared Ray cluster and a real MLflow server."""

from __future__ import annotations

import json

import yaml
from mlflow.tracking import MlflowClient

from loraforge.cluster import free_port
from loraforge.pipeline import run_pipeline
from loraforge.spec import parse_spec
from loraforge.tracking import PARENT_TAG, STAGE_TAG


def test_pipeline_curate_train_evaluate_serve(ray_cluster, mlflow_server, lab, tmp_path):
    task = "add"
    spec = parse_spec(yaml.safe_load(f"""
name: e2e
model: lab
mlflow: {{experiment: e2e}}
stages:
  - kind: curate
    inputs: [{{path: "lab://tasks/{task}_train.jsonl"}}]
  - kind: train
    num_workers: 2
    max_steps: 30
    batch_size: 16
    learning_rate: 0.003
    checkpoint_every: 15
  - kind: evaluate
    tasks: ["lab://tasks/{task}_eval.jsonl"]
    max_examples: 32
  - kind: serve
    port: {free_port()}
    smoke_prompts: ["What is 2 + 5?"]
"""))
    result = run_pipeline(spec, mlflow_server)
    out = result.summary()

    # Every stage produced its output and they chained.
    assert out["curate_counts"]["kept"] > 0
    assert (result.run_dir / "train" / "adapter" / "adapter_model.safetensors").is_file()
    metrics = out["eval"]
    before, after = metrics[f"before.accuracy.{task}"], metrics[f"after.accuracy.{task}"]
    assert after > before, f"fine-tuning on {task} should raise its accuracy ({before} -> {after})"
    assert "forgetting.perplexity_delta" in metrics
    answers = out["smoke_answers"]
    assert {a["model"] for a in answers} >= {"adapter"}
    assert all(isinstance(a["answer"], str) for a in answers)
    assert json.loads((result.run_dir / "evaluate" / "eval.json").read_text())["metrics"] == metrics

    # MLflow: one finished parent with a finished child per stage, each holding what it logged.
    client = MlflowClient(mlflow_server)
    parent = client.get_run(result.run.run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags[STAGE_TAG] == "pipeline"
    children = client.search_runs([parent.info.experiment_id], f"tags.`{PARENT_TAG}` = '{parent.info.run_id}'")
    by_stage = {c.data.tags[STAGE_TAG]: c for c in children}
    assert set(by_stage) == {"curate", "train", "evaluate", "serve"}
    assert all(c.info.status == "FINISHED" for c in children)
    losses = client.get_metric_history(by_stage["train"].info.run_id, "loss")
    assert len(losses) == 30
    assert by_stage["evaluate"].data.metrics[f"after.accuracy.{task}"] == after
    train_artifacts = {a.path for a in client.list_artifacts(by_stage["train"].info.run_id, "adapter")}
    assert "adapter/adapter_model.safetensors" in train_artifacts
    assert by_stage["curate"].data.metrics["rows.kept"] == out["curate_counts"]["kept"]
