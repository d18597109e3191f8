"""Every curation op on the shared Ray cluster, on real data with planted problems, as a user runs it.

Run 1 (cleaning): filters, PII, exact/line/fuzzy dedup, contamination against GSM8K, mixture with
rehearsal, over JSONL + Parquet + plain-text inputs. Run 2 (model ops): perplexity, IFD, token
cleaning, MoDS and a curriculum, then train's reader. Both check the ledger accounts for every row.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from lab_adapters import make_random_adapter
from mlflow.tracking import MlflowClient

from loraforge.context import StageContext
from loraforge.data.pipeline import run_curate, steps_run
from loraforge.data.schema import OUTPUT_SCHEMA
from loraforge.paths import shared_data_dir
from loraforge.spec import CurateSpec
from loraforge.tracking import start_run
from loraforge.train.training_rows import read_training_rows

pytestmark = pytest.mark.integration


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.open() if line.strip()]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def light_edit(question: str, k: int) -> str:
    """The kinds of edits a scraped copy of a benchmark question shows."""
    words = question.split()
    if k == 0:
        return "Solve: " + question
    if k == 1:
        return question.lower()
    if k == 2:
        return " ".join(words[:5] + words[6:])  # one word dropped
    if k == 3:
        return question.replace("?", "? Explain.")
    return " ".join(w if not w.isdigit() else str(int(w) + 1) for w in words)  # numbers changed


def ledger_of(result) -> dict[str, dict]:
    return {r["id"]: r for r in pq.read_table(result.ledger_path).to_pylist()}


def output_rows(result) -> list[dict]:
    return pq.read_table(result.data_dir).to_pylist()


def check_accounting(result) -> None:
    m = result.manifest
    assert m["in"] == m["kept"] + m["dropped"] + m["merged"] == len(ledger_of(result))
    assert len(output_rows(result)) == m["kept"]


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> dict:
    """A corpus built from real rows, with known problems planted at known lines."""
    shared = shared_data_dir()
    tmp = tmp_path_factory.mktemp("planted")
    seed = read_jsonl(shared / "self_instruct_seed_tasks.jsonl")
    gsm = read_jsonl(shared / "gsm8k_test.jsonl")
    # The seed task with the longest single answer: its copy with one more sentence is a near duplicate
    # (word 5-gram Jaccard ~0.9) that the heuristic score prefers (a fuller answer).
    line, task = max(
        ((i, t) for i, t in enumerate(seed, start=1) if len(t["instances"]) == 1),
        key=lambda it: len(it[1]["instances"][0]["output"].split()),
    )
    inst = task["instances"][0]
    longer = inst["output"] + " I hope this answer helps you with the task."
    shared_line = "Always double-check the units before writing down the final answer."
    rows = [
        {"instruction": task["instruction"], "input": inst["input"], "output": longer},  # 1 near dup (kept)
        {"instruction": "Give me a way to reach the support team.",
         "output": "Write to jane.doe@example.com or call +44 20 7946 0958 during office hours."},  # 2 PII
        {"instruction": "How do I pay?", "output": "Use card 4111 1111 1111 1111 at 221 Baker Street."},  # 3 PII
        {"instruction": "First tip for word problems.", "output": f"Read the question twice.\n{shared_line}"},  # 4
        {"instruction": "Second tip for word problems.", "output": f"Draw a picture.\n{shared_line}"},  # 5 line dup
        '{"instruction": "broken", ',  # 6 parse / bad_json
        {"prompt": "Name a prime number.", "chosen": "Seven is a prime number.", "rejected": "Nine."},  # 7 pref
        {"instruction": "Spam", "output": "buy now " * 40},  # 8 filter / repeated_ngrams
    ]
    gsm_rows = [{"instruction": light_edit(g["question"], k), "output": g["answer"]} for k, g in enumerate(gsm[:5])]
    jsonl = write_jsonl(tmp / "planted.jsonl", rows + gsm_rows)  # GSM8K at lines 9..13
    parquet = tmp / "chats.parquet"
    pq.write_table(pa.Table.from_pylist([
        {"messages": [{"role": "user", "content": "What colour is the sky on a clear day?"},
                      {"role": "assistant", "content": "It is blue on a clear day."}]},
        {"messages": [{"role": "user", "content": "Say hi"}]},  # parse / no_assistant
    ]), parquet)
    return {"jsonl": jsonl, "parquet": parquet, "seed_line": line, "shared_line": shared_line}


def test_cleaning_ops_on_real_data_with_planted_problems(ray_cluster, mlflow_server, planted, tmp_path):
    shared = shared_data_dir()
    spec = CurateSpec(
        inputs=[
            {"path": str(shared / "self_instruct_seed_tasks.jsonl"), "name": "seed", "group": "human"},
            {"path": str(shared / "self_instruct_user_oriented.jsonl"), "name": "user", "group": "human"},
            {"path": str(planted["jsonl"]), "name": "planted", "group": "human"},
            {"path": str(planted["parquet"]), "name": "chats", "group": "human"},
            {"path": "lab://tasks/add_train.jsonl", "format": "alpaca", "name": "add", "group": "lab"},
            {"path": "lab://general_train.txt", "format": "text", "name": "general", "rehearsal": True},
        ],
        dedup={"lines": True},
        contamination={"eval_sets": [str(shared / "gsm8k_test.jsonl")]},
        # human rows are the scarcer group at 70/30, so all of them stay and the lab rows are cut
        mixture={"proportions": {"human": 0.7, "lab": 0.3}, "rehearsal_share": 0.1},
    )
    run = start_run(mlflow_server, "curate-tests", "curate-full", "curate", "curate-full")
    result = run_curate(spec, StageContext(run_dir=tmp_path / "run", model="lab", run=run))
    run.finish()
    check_accounting(result)
    m, ledger = result.manifest, ledger_of(result)

    # contamination: every planted GSM8K question is caught and names its eval item; nothing else is
    for k in range(5):
        entry = ledger[f"planted:{9 + k}"]
        assert (entry["status"], entry["op"]) == ("dropped", "contamination"), entry
        assert f"gsm8k_test:{k + 1}" in entry["detail"]
    flagged = [i for i, e in ledger.items() if e["op"] == "contamination"]
    assert sorted(flagged) == sorted(f"planted:{9 + k}" for k in range(5))

    # fuzzy dedup keeps the better member of the cluster (the fuller answer), not the first one
    original = ledger[f"seed:{planted['seed_line']}#1"]
    assert (original["status"], original["op"], original["merged_into"]) == ("merged", "fuzzy_dedup", "planted:1")
    assert "Jaccard" in original["detail"] or "jaccard" in original["detail"]

    out = {r["id"]: r for r in output_rows(result)}
    # line dedup: the repeated line is cut from the later row only
    assert planted["shared_line"] in out["planted:4"]["messages"][-1]["content"]
    assert planted["shared_line"] not in out["planted:5"]["messages"][-1]["content"]
    assert m["lines_removed"] >= 1
    # PII: typed placeholders in the output, nothing raw left anywhere
    assert "[EMAIL]" in out["planted:2"]["messages"][-1]["content"]
    assert "[PHONE]" in out["planted:2"]["messages"][-1]["content"]
    assert "[CREDIT_CARD]" in out["planted:3"]["messages"][-1]["content"]
    everything = json.dumps([r["messages"] for r in out.values()])
    assert "jane.doe@example.com" not in everything and "4111 1111 1111 1111" not in everything
    assert m["pii_redacted"]["email"] >= 1 and m["pii_redacted"]["credit_card"] == 1
    # formats: a preference pair, a Parquet chat row and bad rows in the ledger
    assert out["planted:7"]["kind"] == "preference" and out["planted:7"]["rejected"] == "Nine."
    assert out["chats:1"]["messages"][0]["content"].startswith("What colour")
    assert (ledger["planted:6"]["op"], ledger["planted:6"]["reason"]) == ("parse", "bad_json")
    assert (ledger["chats:2"]["op"], ledger["chats:2"]["reason"]) == ("parse", "no_assistant")
    assert (ledger["planted:8"]["op"], ledger["planted:8"]["reason"]) == ("filter", "repeated_ngrams")

    # mixture: 70/30 between the groups (within one row), rehearsal 10% of the output, spread out
    groups = m["kept_by_group"]
    main = groups["human"] + groups["lab"]
    assert abs(groups["human"] - 0.7 * main) <= 1 and abs(groups["lab"] - 0.3 * main) <= 1
    assert m["by_reason"]["over_proportion"] > 0 and m["by_reason"]["rehearsal_cap"] > 0
    assert abs(groups["general"] / m["kept"] - 0.1) < 0.01
    rows = output_rows(result)
    assert [r["position"] for r in rows] == list(range(len(rows)))  # written in position order
    replay = [i for i, r in enumerate(rows) if r["group"] == "general"]
    assert replay[0] < len(rows) * 0.2 and replay[-1] > len(rows) * 0.8  # not bunched at one end

    # manifest, funnel and MLflow
    assert [s["step"] for s in m["funnel"]] == ["in", *steps_run(spec)]
    assert m["by_op"]["contamination"] == 5 and m["by_reason"]["near_duplicate"] >= 1
    assert "heuristic_score" in m["score_histograms"]
    assert sum(m["score_histograms"]["heuristic_score"]["counts"]) == m["kept"]
    assert pq.read_table(result.data_dir).schema.names == OUTPUT_SCHEMA.names
    client = MlflowClient(mlflow_server)
    logged = client.get_run(run.run_id).data
    assert logged.metrics["rows.kept"] == m["kept"] and logged.metrics["rows.after.contamination"] > 0
    assert logged.params["dedup.threshold"] == "0.8"
    assert {a.path for a in client.list_artifacts(run.run_id, "curate")} >= {
        "curate/manifest.json", "curate/ledger.parquet", "curate/funnel.png"}


def test_model_scores_mods_and_curriculum_feed_train(ray_cluster, lab, planted, tmp_path):
    shared = shared_data_dir()
    reference = make_random_adapter(lab.model_dir, tmp_path / "reference", seed=3)
    spec = CurateSpec(
        inputs=[
            {"path": "lab://tasks/add_train.jsonl", "format": "alpaca", "name": "add"},
            {"path": "lab://tasks/max3_train.jsonl", "format": "alpaca", "name": "max3"},
            {"path": str(shared / "self_instruct_seed_tasks.jsonl"), "name": "seed"},
        ],
        scores={"token_cleaning": {"reference_model": str(reference), "keep_fraction": 0.6}},
        mods={"coverage_size": 0.3, "necessity": {"train_steps": 10, "max_new_tokens": 12}},
        mixture={"curriculum": {"by": "ifd", "order": "ascending"}},
    )
    result = run_curate(spec, StageContext(run_dir=tmp_path / "run", model=str(lab.model_dir), model_ref="lab"))
    check_accounting(result)
    m, ledger = result.manifest, ledger_of(result)
    reasons = m["by_reason"]
    assert reasons.get("ifd_above_one", 0) > 0  # IFD > 1 rows exist in real data and are dropped
    assert all(e["detail"] for e in ledger.values() if e["op"] in ("scores", "mods"))
    assert m["mods"]["coverage_size"] > 0 and m["mods"]["selected"] >= m["mods"]["coverage_size"]
    assert reasons.get("not_selected", 0) > 0

    rows = output_rows(result)
    assert all(r["ifd"] is not None and r["ifd"] <= 1.0 for r in rows)
    assert [r["ifd"] for r in rows] == sorted(r["ifd"] for r in rows)  # curriculum: ascending IFD
    assert all(r["quality"] is not None and r["quality"] >= spec.mods.quality_threshold for r in rows)
    weights = [w for r in rows for w in r["loss_weights"]]
    assert set(weights) == {0.0, 1.0}
    # 60% of tokens ranked over the whole scored set (MoDS then drops rows, so the output share moves)
    assert 0.3 < sum(weights) / len(weights) < 0.9
    per_row = {round(sum(r["loss_weights"]) / len(r["loss_weights"]), 2) for r in rows if r["loss_weights"]}
    assert len(per_row) > 3  # a dataset-wide threshold, not a fixed share of every row
    assert set(m["score_histograms"]) >= {"ppl", "ifd", "quality"}
    assert m["scores"]["token_threshold"] is not None

    # train reads the weights and the curriculum order back
    train_rows = read_training_rows(result.output_dir)
    assert [r.id for r in train_rows] == [r["id"] for r in rows]
    assert all(r.loss_weights is not None for r in train_rows)
