"""Embedded local Ray + MLflow server for laptops; the Ray Jobs client for remote clusters.

`Services` starts what is not given (RAY_ADDRESS / --address, MLFLOW_TRACKING_URI) and stops
only what it started.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from loraforge import paths
from loraforge.errors import ClusterError

DEFAULT_MLFLOW_PORT = 5055
LOCAL_RAY_CPUS = max(4, os.cpu_count() or 2)  # Tune trial drivers need CPUs beside their workers


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mlflow_alive(uri: str, timeout: float = 2.0) -> bool:
    try:
        return httpx.get(f"{uri.rstrip('/')}/health", timeout=timeout).status_code == 200
    except httpx.HTTPError:
        return False


@dataclass
class MlflowServer:
    uri: str
    process: subprocess.Popen | None
    log_path: Path

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()


def start_mlflow_server(store_dir: Path, port: int = DEFAULT_MLFLOW_PORT, timeout: float = 90) -> MlflowServer:
    """A real `mlflow server` with a SQLite backend and a local artifact folder."""
    uri = f"http://127.0.0.1:{port}"
    if port_in_use(port):
        if mlflow_alive(uri):
            return MlflowServer(uri, None, store_dir / "mlflow.log")  # reuse, do not own
        raise ClusterError(
            f"port {port} is in use by something that is not an MLflow server; "
            "pass --mlflow-port or set MLFLOW_TRACKING_URI"
        )
    store_dir.mkdir(parents=True, exist_ok=True)
    (store_dir / "artifacts").mkdir(exist_ok=True)
    log_path = store_dir / "mlflow.log"
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    cmd = [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", f"sqlite:///{store_dir / 'mlflow.db'}",
        "--artifacts-destination", str(store_dir / "artifacts"),
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]
    log = log_path.open("ab")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            tail = log_path.read_text(errors="replace")[-2000:]
            raise ClusterError(f"mlflow server exited with code {proc.returncode}:\n{tail}")
        if mlflow_alive(uri):
            return MlflowServer(uri, proc, log_path)
        time.sleep(0.5)
    proc.kill()
    raise ClusterError(f"mlflow server did not answer on {uri} within {timeout:.0f}s (log: {log_path})")


@dataclass
class Services:
    """Ray + MLflow for one CLI command: reuse given ones, start and later stop the rest."""

    ray_address: str | None = None
    mlflow_uri: str | None = None
    mlflow_port: int = DEFAULT_MLFLOW_PORT
    _mlflow: MlflowServer | None = field(default=None, init=False)
    _started_ray: bool = field(default=False, init=False)

    def __enter__(self) -> Services:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        import ray

        uri = self.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI")
        if uri:
            if uri.startswith("http") and not mlflow_alive(uri):
                raise ClusterError(f"no MLflow server answers at {uri} (MLFLOW_TRACKING_URI / --mlflow-uri)")
            self.mlflow_uri = uri
        else:
            self._mlflow = start_mlflow_server(paths.home() / "mlflow", self.mlflow_port)
            self.mlflow_uri = self._mlflow.uri
        os.environ["MLFLOW_TRACKING_URI"] = self.mlflow_uri

        if ray.is_initialized():
            return
        address = self.ray_address or os.environ.get("RAY_ADDRESS")
        env_vars = {"MLFLOW_TRACKING_URI": self.mlflow_uri, "LORAFORGE_HOME": str(paths.home())}
        if os.environ.get("LORAFORGE_SHARED_DATA"):
            env_vars["LORAFORGE_SHARED_DATA"] = os.environ["LORAFORGE_SHARED_DATA"]
        try:
            if address:
                # An existing cluster (or a submitted job, whose runtime env Ray merges) keeps its own
                # environment; stages pass MLflow run handles and resolved paths explicitly.
                ray.init(address=address, log_to_driver=True)
            else:
                ray.init(
                    num_cpus=LOCAL_RAY_CPUS,
                    # The dashboard serves the State API that Ray Train's clean-up of aborted runs needs.
                    include_dashboard=True,
                    runtime_env={"env_vars": env_vars},
                    configure_logging=True,
                    logging_level="WARNING",
                )
                self._started_ray = True
        except (ConnectionError, ValueError, RuntimeError) as err:
            raise ClusterError(f"cannot connect to Ray at {address or 'a new local cluster'}: {err}") from None

    @property
    def owns_mlflow(self) -> bool:
        return self._mlflow is not None and self._mlflow.process is not None

    def stop(self) -> None:
        import ray

        if self._started_ray and ray.is_initialized():
            ray.shutdown()
        if self._mlflow:
            self._mlflow.stop()
