"""The CLI as a user runs it: a subprocess, exit codes, messages; no cluster is started."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

from loraforge.paths import PROJECT_ROOT

LORAFORGE = str(Path(sys.executable).parent / "loraforge")


def _run(*args: str, cwd: Path = PROJECT_ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([LORAFORGE, *args], capture_output=True, text=True, timeout=120, cwd=cwd)


def test_validate_ok() -> None:
    res = _run("validate", "ray_jobs/configs/demo.yaml")
    assert res.returncode == 0, res.stderr
    assert "ok (curate, tune, train, evaluate, serve)" in res.stdout


def test_validate_lists_every_problem_and_exits_2(tmp_path: Path) -> None:
    job = tmp_path / "job.yaml"
    job.write_text("name: demo\nstages:\n  - kind: train\n    strategy: tpu\n    lora: {alpah: 3}\n")
    res = _run("validate", str(job))
    assert res.returncode == 2
    assert "stages.0.strategy" in res.stderr and "stages.0.lora.alpah" in res.stderr


def test_run_with_bad_spec_starts_nothing(tmp_path: Path) -> None:
    job = tmp_path / "job.yaml"
    job.write_text("kind: curate\ninputs: [{path: /definitely/missing.jsonl}]\n")
    home = tmp_path / "home"
    res = subprocess.run([LORAFORGE, "run", str(job)], capture_output=True, text=True, timeout=120,
                         env={"PATH": "/usr/bin:/bin", "LORAFORGE_HOME": str(home)})
    assert res.returncode == 2
    assert "/definitely/missing.jsonl" in res.stderr
    assert not home.exists(), "no run folder or MLflow store may be created for an invalid job"


def test_missing_job_file_and_unknown_command() -> None:
    res = _run("validate", "no/such/job.yaml")
    assert res.returncode == 2 and "no such file" in res.stderr
    assert _run("frobnicate").returncode == 2


def test_dashboard_port_in_use_is_a_clear_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        res = _run("dashboard", "--port", str(port))
    assert res.returncode == 2
    assert f"port {port}" in res.stderr


def test_submit_to_bad_address_exits_2() -> None:
    res = _run("submit", "ray_jobs/configs/demo.yaml", "--address", "localhost:1")
    assert res.returncode == 2 and "--address" in res.stderr
