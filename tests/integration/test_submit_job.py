"""`loraforge submit|status|logs|stop` against a real `ray start --head` on this machine."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from loraforge.cluster import free_port
from loraforge.paths import PROJECT_ROOT, shared_data_dir

BIN = Path(sys.executable).parent


def _cli(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "loraforge"), *args], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=PROJECT_ROOT)


@pytest.fixture(scope="module")
def head_node(tmp_path_factory, mlflow_server, lab):
    """A separate Ray cluster started the way an operator would, with its own ports."""
    tmp = tmp_path_factory.mktemp("rayhead")
    port, dash = free_port(), free_port()
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_AUTH_MODE": "token"}
    # Token auth, as Ray 2.60 clusters default to: the CLI must find and send the token.
    subprocess.run([str(BIN / "ray"), "get-auth-token", "--generate"], env=env, capture_output=True, check=True)
    # --block keeps the head in our process group, so teardown stops this cluster and no other
    # (`ray stop` would also stop the session's shared cluster).
    proc = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", f"--port={port}", f"--dashboard-port={dash}",
         "--dashboard-host=127.0.0.1", "--num-cpus=2", "--include-dashboard=true",
         # The session's shared cluster already holds Ray's default agent ports on this machine.
         f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
         f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
         f"--ray-client-server-port={free_port()}",
         f"--temp-dir={tmp}", "--disable-usage-stats"],
        stdout=(tmp / "head.log").open("wb"), stderr=subprocess.STDOUT, env=env, start_new_session=True,
    )
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 180
        while not _answers(f"{address}/api/version"):
            assert proc.poll() is None and time.time() < deadline, (tmp / "head.log").read_text()[-3000:]
            time.sleep(1)
        yield address, env
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def _answers(url: str) -> bool:
    """Up once it answers at all: without the token it says 401, which still means it is serving."""
    try:
        return httpx.get(url, timeout=2).status_code < 500
    except httpx.HTTPError:
        return False


def _wait_for(address: str, job_id: str, env: dict[str, str], want: set[str], timeout: float = 300) -> str:
    deadline = time.time() + timeout
    state = ""
    while time.time() < deadline:
        res = _cli("status", job_id, "--address", address, env=env)
        assert res.returncode == 0, res.stderr
        state = res.stdout.strip()
        if state in want:
            return state
        time.sleep(2)
    raise AssertionError(f"job {job_id} still {state} after {timeout}s")


def test_submit_curate_job_runs_to_success_and_logs_come_back(head_node, tmp_path):
    address, env = head_node
    data = shared_data_dir() / "self_instruct_seed_tasks.jsonl"
    job = tmp_path / "curate_job.yaml"
    job.write_text(f"kind: curate\ninputs:\n  - {{path: {data}}}\n")
    sub = _cli("submit", str(job), "--address", address, env=env)
    assert sub.returncode == 0, sub.stdout + sub.stderr
    job_id = sub.stdout.strip().splitlines()[-1]
    assert _wait_for(address, job_id, env, {"SUCCEEDED", "FAILED", "STOPPED"}) == "SUCCEEDED", \
        _cli("logs", job_id, "--address", address, env=env).stdout[-3000:]
    logs = _cli("logs", job_id, "--address", address, env=env)
    assert logs.returncode == 0
    assert "stage curate done" in logs.stdout + logs.stderr or "stage curate done" in logs.stdout
    assert "mlflow_run_id" in logs.stdout


def test_stop_a_running_job(head_node, tmp_path):
    address, env = head_node
    job = tmp_path / "slow.yaml"
    # A pipeline that first builds nothing heavy but trains for long: stopped before it finishes.
    job.write_text("kind: train\ndata: lab://tasks/add_train.jsonl\nmax_steps: 100000\nnum_workers: 1\n")
    sub = _cli("submit", str(job), "--address", address, env=env)
    assert sub.returncode == 0, sub.stderr
    job_id = sub.stdout.strip().splitlines()[-1]
    _wait_for(address, job_id, env, {"RUNNING"}, timeout=120)
    stop = _cli("stop", job_id, "--address", address, env=env)
    assert stop.returncode == 0 and "stopping" in stop.stdout
    assert _wait_for(address, job_id, env, {"STOPPED", "FAILED", "SUCCEEDED"}, timeout=120) == "STOPPED"


def test_unknown_job_and_bad_address_are_clear_errors(head_node):
    address, env = head_node
    res = _cli("status", "raysubmit_doesnotexist", "--address", address, env=env)
    assert res.returncode == 2 and "raysubmit_doesnotexist" in res.stderr
    res = _cli("status", "x", "--address", "localhost:1", env=env)
    assert res.returncode == 2 and "--address" in res.stderr
