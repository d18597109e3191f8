"""The curate stage on the shared local Ray cluster, with a real MLflow server and real data."""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from mlflow.tracking import MlflowClient

from loraforge.context import StageContext
from loraforge.data.filters import length_only as filters_only
from loraforge.data.io import read_conversations
from loraforge.data.pipeline import run_curate
from loraforge.data.schema import LEDGER_SCHEMA, MESSAGES_TYPE, OUTPUT_SCHEMA
from loraforge.errors import DataError
from loraforge.paths import PROJECT_ROOT, shared_data_dir
from loraforge.spec import CurateSpec
from loraforge.tracking import start_run

pytestmark = pytest.mark.integration


def user_answer(user: str, answer: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


@pytest.fixture
def mixed_inputs(tmp_path) -> tuple[Path, Path]:
    alpha = write_jsonl(tmp_path / "alpha_raw.jsonl", [
        {"instruction": "Name a colour", "input": "", "output": "Blue"},  # 1 kept
        {"instruction": "Add", "input": "2+3", "output": "5"},  # 2 kept
        '{"instruction": "broken", ',  # 3 parse/bad_json
        {"messages": user_answer("What is the capital of France?", "Paris")},  # 4 kept
        {"instruction": "Name a  colour", "input": " ", "output": "Blue "},  # 5 merged -> alpha:1
        {"instruction": "Say nothing", "output": ""},  # 6 filter/empty
        {"instruction": "Write a lot", "output": "x" * 500},  # 7 filter/too_long
        "",  # 8 blank: not a row
        "[1, 2, 3]",  # 9 parse/not_object
        {"instruction": "Missing output"},  # 10 parse/missing_field
        {"instruction": "Name a colour", "input": "", "output": "blue"},  # 11 kept: case differs
    ])
    beta = write_jsonl(tmp_path / "b.jsonl", [
        {"messages": user_answer("Add\n\n2+3", "5")},  # 1 merged -> alpha:2 (other file, other format)
        {"conversations": [{"from": "human", "value": "What is the capital of France?"},
                           {"from": "gpt", "value": "Paris"}]},  # 2 merged -> alpha:4
        {"messages": [{"role": "user", "content": "hi"}]},  # 3 parse/no_assistant
        {"messages": user_answer("Tell me", "Sure thing")},  # 4 kept
        {"instruction": "Antonym of", "instances": [{"input": "hot", "output": "cold"},
                                                    {"input": "up", "output": "down"}]},  # 5#1, 5#2 kept
        {"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "x"}]},  # 6 bad_type
        {"messages": user_answer("Tell  me", "Sure thing")},  # 7 merged -> b:4
    ])
    return alpha, beta


def snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_curate_mixed_inputs_ledger_parquet_and_mlflow(ray_cluster, mlflow_server, mixed_inputs, tmp_path):
    alpha, beta = mixed_inputs
    # Length filters and exact dedup only: the other ops have their own tests (test_curate_full.py).
    spec = CurateSpec(inputs=[{"path": str(alpha), "name": "alpha"}, {"path": str(beta), "format": "auto"}],
                      filters=filters_only(min_chars=1, max_chars=300), pii={"enabled": False}, dedup={"fuzzy": False})
    run = start_run(mlflow_server, "curate-tests", "curate", "curate", "curate-test")
    ctx = StageContext(run_dir=tmp_path / "run", model="lab", run=run)
    result = run_curate(spec, ctx)
    run.finish()

    assert result.output_dir == tmp_path / "run" / "curate"  # default: the run's stage folder
    m = result.manifest
    counts = {k: m[k] for k in ("in", "kept", "dropped", "merged")}
    assert counts == {"in": 18, "kept": 7, "dropped": 7, "merged": 4}
    assert m["in"] == m["kept"] + m["dropped"] + m["merged"]
    assert m["by_source"] == {"alpha": {"in": 10, "kept": 4, "dropped": 5, "merged": 1},
                              "b": {"in": 8, "kept": 3, "dropped": 2, "merged": 3}}
    assert m["by_op"] == {"exact_dedup": 4, "filter": 2, "parse": 5}
    assert m["by_reason"] == {"bad_json": 1, "bad_type": 1, "duplicate": 4, "empty": 1, "missing_field": 1,
                              "no_assistant": 1, "not_object": 1, "too_long": 1}
    assert [(s["step"], s["rows"]) for s in m["funnel"]] == [
        ("in", 18), ("parse", 13), ("filter", 11), ("exact_dedup", 7), ("mixture", 7)]
    assert json.loads(result.manifest_path.read_text()) == m

    ledger = pq.read_table(result.ledger_path)
    assert ledger.schema == LEDGER_SCHEMA
    entries = {r["id"]: r for r in ledger.to_pylist()}
    assert len(entries) == 18
    assert {k: r["merged_into"] for k, r in entries.items() if r["status"] == "merged"} == {
        "alpha:5": "alpha:1", "b:1": "alpha:2", "b:2": "alpha:4", "b:7": "b:4"}
    assert (entries["alpha:3"]["op"], entries["alpha:3"]["reason"]) == ("parse", "bad_json")
    assert "Expecting" in entries["alpha:3"]["detail"]
    assert (entries["alpha:6"]["op"], entries["alpha:6"]["reason"]) == ("filter", "empty")
    assert entries["alpha:7"]["reason"] == "too_long"

    files = sorted(result.data_dir.glob("part-*.parquet"))
    assert files and {p.name for p in result.output_dir.iterdir()} == {
        "data", "ledger.parquet", "manifest.json", "funnel.png"}
    data = pq.read_table(result.data_dir)
    assert data.schema.field("messages").type == MESSAGES_TYPE
    assert data.column_names == OUTPUT_SCHEMA.names
    assert data.column("position").to_pylist() == list(range(7))  # output order, no curriculum: input order
    ids = [i for f in files for i in pq.read_table(f).column("id").to_pylist()]
    assert ids == ["alpha:1", "alpha:2", "alpha:4", "alpha:11", "b:4", "b:5#1", "b:5#2"]  # input order
    convs = read_conversations(result.output_dir)
    assert convs[0] == user_answer("Name a colour", "Blue")
    assert convs[5] == user_answer("Antonym of\n\nhot", "cold")

    client = MlflowClient(mlflow_server)
    logged = client.get_run(run.run_id).data
    assert {k: logged.metrics[k] for k in ("rows.in", "rows.kept", "rows.dropped", "rows.merged")} == {
        "rows.in": 18, "rows.kept": 7, "rows.dropped": 7, "rows.merged": 4}
    assert logged.params["inputs.0.name"] == "alpha" and logged.params["filters.max_chars"] == "300"
    artifacts = {a.path for a in client.list_artifacts(run.run_id, "curate")}
    assert artifacts == {"curate/manifest.json", "curate/ledger.parquet", "curate/funnel.png"}
    local = Path(client.download_artifacts(run.run_id, "curate", str(tmp_path / "dl")))
    assert json.loads((local / "manifest.json").read_text())["merged"] == 4
    assert pq.read_table(local / "ledger.parquet").num_rows == 18
    assert (local / "funnel.png").read_bytes()[:4] == b"\x89PNG"

    # A rerun into the same, now non-empty, folder is refused and changes nothing.
    before = snapshot(result.output_dir)
    with pytest.raises(DataError, match=str(result.output_dir)):
        run_curate(spec, ctx)
    assert snapshot(result.output_dir) == before
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["curate"]  # no staging folder left behind


def test_curate_whole_file_problems_raise_data_error(ray_cluster, tmp_path, mixed_inputs):
    alpha, _ = mixed_inputs
    ctx = StageContext(run_dir=tmp_path / "run", model="lab")
    missing = CurateSpec(inputs=[{"path": str(alpha)}, {"path": str(tmp_path / "nope.jsonl")}])
    with pytest.raises(DataError, match=r"inputs\.1\.path.*nope\.jsonl"):
        run_curate(missing, ctx)
    with pytest.raises(DataError, match="is not a file"):
        run_curate(CurateSpec(inputs=[{"path": str(tmp_path)}]), ctx)
    same_name = CurateSpec(inputs=[{"path": str(alpha)}, {"path": str(alpha)}])
    with pytest.raises(DataError, match="share the source name 'alpha_raw'"):
        run_curate(same_name, ctx)
    nothing = write_jsonl(tmp_path / "junk.jsonl", ["nope", '{"instruction": "q", "output": ""}'])
    out = tmp_path / "junk_out"
    with pytest.raises(DataError, match=r"kept no rows out of 2 \(bad_json: 1, empty: 1\)"):
        run_curate(CurateSpec(inputs=[{"path": str(nothing)}], output=str(out)), ctx)
    assert pq.read_table(out / "ledger.parquet").num_rows == 2  # the ledger still says why


def _load_script():
    spec = importlib.util.spec_from_file_location("curate_job", PROJECT_ROOT / "ray_jobs" / "curate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_curate_script_on_real_self_instruct_and_lab_data(ray_cluster, lab, tmp_path, capsys):
    shared = shared_data_dir()
    task = lab.tasks[0]
    job = tmp_path / "curate.yaml"
    job.write_text(yaml.safe_dump({"kind": "curate", "inputs": [
        {"path": str(shared / "self_instruct_seed_tasks.jsonl"), "name": "seed"},
        {"path": str(shared / "self_instruct_user_oriented.jsonl"), "format": "self_instruct", "name": "user"},
        {"path": f"lab://tasks/{task}_train.jsonl", "format": "alpaca"},
    ]}))
    out = tmp_path / "out"
    assert _load_script().main([str(job), "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    m = json.loads(printed[: printed.rindex("}") + 1])

    lab_lines = sum(1 for line in (lab.data_dir / "tasks" / f"{task}_train.jsonl").open() if line.strip())
    assert {s: v["in"] for s, v in m["by_source"].items()} == {
        "seed": 175, "user": 252, f"{task}_train": lab_lines}  # one instance per self-instruct line
    c = m
    assert c["in"] == c["kept"] + c["dropped"] + c["merged"] == 175 + 252 + lab_lines
    assert m["by_source"]["seed"]["kept"] > 150 and m["by_source"]["user"]["kept"] > 200
    assert m["by_op"].get("parse", 0) == 0  # real data parses cleanly
    ledger = pq.read_table(out / "ledger.parquet").to_pylist()
    assert ledger[0]["id"] == "seed:1#1" and ledger[175]["id"] == "user:1#1"
    convs = read_conversations(out)
    assert len(convs) == c["kept"]
    first = json.loads((shared / "self_instruct_seed_tasks.jsonl").open().readline())
    assert convs[0] == user_answer(first["instruction"], first["instances"][0]["output"])

    # the script's error path: a user error exits with code 2 and says why
    assert _load_script().main([str(job), "--output", str(out)]) == 2
    assert "already exists and is not empty" in capsys.readouterr().err
