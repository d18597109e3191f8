"""ray_jobs/tune.py refuses bad job files before it touches Ray."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import yaml

from loraforge.paths import PROJECT_ROOT

SCRIPT = PROJECT_ROOT / "ray_jobs" / "tune.py"


def _load_job():
    spec = importlib.util.spec_from_file_location("tune_job", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write(path, data):
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_specs_from_two_files_or_one_pipeline(tmp_path):
    job = _load_job()
    tune = _write(tmp_path / "tune.yaml", {"kind": "tune", "num_samples": 3})
    train = _write(tmp_path / "train.yaml", {"kind": "train", "data": "lab://tasks/add_train.jsonl", "model": "m"})
    tune_spec, train_spec, model, seed, name = job._specs([train, tune])  # order does not matter
    assert (tune_spec.num_samples, model, seed, name) == (3, "m", 0, "tune")
    assert train_spec.data == "lab://tasks/add_train.jsonl"
    pipe = _write(tmp_path / "pipe.yaml", {
        "name": "p1", "seed": 5,
        "stages": [{"kind": "tune", "max_steps": 4, "grace_period": 2}, {"kind": "train", "data": "x.jsonl"}],
    })
    tune_spec, train_spec, model, seed, name = job._specs([pipe])
    assert (tune_spec.max_steps, train_spec.data, model, seed, name) == (4, "x.jsonl", "lab", 5, "p1")


def test_missing_train_stage_exits_2_without_ray(tmp_path):
    tune = _write(tmp_path / "tune.yaml", {"kind": "tune"})
    code = (
        f"import runpy, sys; sys.argv = ['tune.py', {tune!r}]\n"
        f"try:\n    runpy.run_path({str(SCRIPT)!r}, run_name='__main__')\n"
        "except SystemExit as e:\n    sys.exit(100 + e.code if 'ray' not in sys.modules else 1)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 102, proc.stderr  # exit code 2, and Ray never imported
    assert "need a tune stage and a train stage" in proc.stderr
