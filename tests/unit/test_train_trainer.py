"""The train stage refuses unusable specs before any cluster work starts."""

from __future__ import annotations

import pytest

from loraforge.context import StageContext
from loraforge.errors import DataError, SpecError
from loraforge.spec import TrainSpec
from loraforge.train.trainer import output_dir, run_train


def test_missing_data_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="data path is required"):
        run_train(TrainSpec(), StageContext(run_dir=tmp_path, model="lab"))


def test_fewer_examples_than_workers_is_a_spec_error(tmp_path):
    spec = TrainSpec(data="x.jsonl", num_workers=4, batch_size=2)
    with pytest.raises(SpecError, match="batch_size"):
        run_train(spec, StageContext(run_dir=tmp_path, model="lab"))


def test_output_defaults_to_the_stage_folder(tmp_path):
    ctx = StageContext(run_dir=tmp_path, model="lab")
    assert output_dir(TrainSpec(), ctx) == (tmp_path / "train" / "adapter").resolve()
    assert output_dir(TrainSpec(output=str(tmp_path / "a")), ctx) == tmp_path / "a"
