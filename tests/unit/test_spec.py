"""Job files: every stage validates, unknown keys and wrong values are named with their field path."""

from __future__ import annotations

from pathlib import Path

import pytest

from loraforge.errors import SpecError
from loraforge.paths import PROJECT_ROOT
from loraforge.spec import PipelineSpec, TrainSpec, check_paths, load_spec, parse_spec

CONFIGS = sorted((PROJECT_ROOT / "ray_jobs" / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_validate(path: Path) -> None:
    spec = load_spec(path)
    check_paths(spec, str(path))


def test_demo_has_every_stage_in_order() -> None:
    spec = load_spec(PROJECT_ROOT / "ray_jobs" / "configs" / "demo.yaml")
    assert isinstance(spec, PipelineSpec)
    assert [s.kind for s in spec.stages] == ["curate", "tune", "train", "evaluate", "serve"]


def _problems(data: dict) -> dict[str, str]:
    with pytest.raises(SpecError) as exc:
        parse_spec(data, "job.yaml")
    return dict(exc.value.problems)


def test_unknown_keys_are_rejected_with_their_path() -> None:
    problems = _problems({"name": "x", "stagez": 1, "stages": [{"kind": "train", "lora": {"rank": 4}}]})
    assert "stagez" in problems
    assert "stages.0.lora.rank" in problems
    assert all("Extra inputs" in m for m in problems.values())


def test_wrong_types_and_values_are_each_reported() -> None:
    problems = _problems({"name": "x", "stages": [
        {"kind": "train", "strategy": "tpu", "max_steps": 0, "lora": {"r": "big"}}]})
    assert set(problems) == {"stages.0.strategy", "stages.0.max_steps", "stages.0.lora.r"}


def test_stage_order_and_uniqueness() -> None:
    train, curate = {"kind": "train"}, {"kind": "curate", "inputs": [{"path": "a.jsonl"}]}
    assert "order" in str(_problems({"name": "x", "stages": [train, curate]}))
    assert "once" in str(_problems({"name": "x", "stages": [train, train]}))
    assert "train stage" in str(_problems({"name": "x", "stages": [{"kind": "tune"}]}))


def test_single_stage_file_and_unknown_kind() -> None:
    assert isinstance(parse_spec({"kind": "train", "max_steps": 3}), TrainSpec)
    assert "kind" in _problems({"kind": "bake"})


def test_learning_rate_range_must_be_ordered() -> None:
    problems = _problems({"kind": "tune", "search": {"learning_rate": {"low": 0.1, "high": 0.01}}})
    assert "search.learning_rate" in problems


def test_check_paths_names_missing_files_and_models(tmp_path: Path) -> None:
    spec = parse_spec({"name": "x", "model": str(tmp_path / "no-model"), "stages": [
        {"kind": "curate", "inputs": [{"path": str(tmp_path / "missing.jsonl")}]},
        {"kind": "train"},
        {"kind": "serve", "adapters": [{"name": "a", "path": str(tmp_path / "nope")}]},
    ]})
    with pytest.raises(SpecError) as exc:
        check_paths(spec, "job.yaml")
    fields = dict(exc.value.problems)
    assert set(fields) == {"model", "stages.0.inputs.0.path", "stages.2.adapters.0.path"}
    assert "missing.jsonl" in fields["stages.0.inputs.0.path"]


def test_malformed_yaml_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(bad)
    with pytest.raises(SpecError, match="no such file"):
        load_spec(tmp_path / "absent.yaml")


def test_a_curated_curriculum_is_trained_in_order_unless_the_job_says_otherwise():
    from loraforge.pipeline import _train_spec

    def pipeline(train: dict) -> PipelineSpec:
        return PipelineSpec.model_validate({"name": "p", "stages": [
            {"kind": "curate", "inputs": [{"path": "x.jsonl"}], "mixture": {"curriculum": {"by": "ifd"}}},
            {"kind": "train", **train}]})

    assert _train_spec(pipeline({}), {}).data_order == "as_written"
    assert _train_spec(pipeline({"data_order": "shuffle"}), {}).data_order == "shuffle"


def test_token_cleaning_requires_train_to_share_the_scoring_tokenisation():
    curate = {"kind": "curate", "inputs": [{"path": "x.jsonl"}],
              "scores": {"max_seq_len": 128, "token_cleaning": {"reference_model": "ref"}}}
    with pytest.raises(SpecError, match="max_seq_len"):
        parse_spec({"name": "p", "stages": [curate, {"kind": "train", "max_seq_len": 256}]})
    with pytest.raises(SpecError, match="same model"):
        parse_spec({"name": "p", "stages": [curate, {"kind": "train", "max_seq_len": 128, "model": "other"}]})
    parse_spec({"name": "p", "stages": [curate, {"kind": "train", "max_seq_len": 128}]})
