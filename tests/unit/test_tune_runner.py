"""The Ray-free parts of the tune runner: trial numbering and the lazy Ray import."""

from __future__ import annotations

import subprocess
import sys

import pytest

from loraforge.tune.runner import _index_from_dirname, _trial_dirname, _trial_label, trial_index


class FakeTrial:
    def __init__(self, trial_id: str):
        self.trial_id = trial_id


def test_trial_numbers_come_from_tune_ids():
    assert trial_index("448c4_00000") == 0
    assert trial_index("448c4_00013") == 13
    assert trial_index("custom") is None
    assert _trial_label("448c4_00002") == "trial-2"
    assert _trial_label("custom") == "trial-custom"


def test_trial_folder_names_round_trip():
    name = _trial_dirname(FakeTrial("ab12c_00003"))
    assert name == "trial-3-ab12c_00003"
    assert _index_from_dirname(name) == 3
    assert _index_from_dirname("lora_trial_ab12c_00003_3_r=4") is None


def test_importing_the_runner_does_not_start_or_import_ray():
    code = "import sys, loraforge.tune.runner; sys.exit('ray' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_run_tune_refuses_bad_input_before_starting_anything(tmp_path):
    from loraforge.context import StageContext
    from loraforge.errors import DataError, SpecError
    from loraforge.spec import TrainSpec, TuneSpec
    from loraforge.tune.runner import run_tune

    ctx = StageContext(run_dir=tmp_path, model="unused")
    data = tmp_path / "train.jsonl"
    data.write_text('{"instruction": "a", "input": "", "output": "b"}\n')
    with pytest.raises(SpecError, match="grace_period"):
        run_tune(TuneSpec(max_steps=4, grace_period=5), TrainSpec(data=str(data)), ctx)
    with pytest.raises(DataError, match="needs `data:`"):
        run_tune(TuneSpec(), TrainSpec(), ctx)
    with pytest.raises(DataError, match="not found"):
        run_tune(TuneSpec(), TrainSpec(data=str(tmp_path / "missing.jsonl")), ctx)
    assert not (tmp_path / "tune").exists()
