"""Start the Streamlit dashboard (dashboard/app.py) against one MLflow tracking server."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from loraforge.cluster import port_in_use
from loraforge.errors import ClusterError
from loraforge.paths import PROJECT_ROOT

APP_PATH = PROJECT_ROOT / "dashboard" / "app.py"


@dataclass
class DashboardProcess:
    """A running `streamlit run` child; `stop()` ends it."""

    url: str
    process: subprocess.Popen

    def wait(self) -> int:
        return self.process.wait()

    def stop(self, timeout: float = 15) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def streamlit_command(port: int, host: str = "127.0.0.1", app: Path = APP_PATH) -> list[str]:
    return [
        sys.executable, "-m", "streamlit", "run", str(app),
        "--server.port", str(port),
        "--server.address", host,
        "--server.headless", "true",
        "--browser.gatherUsageStats", "false",  # no phoning home from clusters without internet
        "--server.fileWatcherType", "none",
        "--client.toolbarMode", "viewer",  # no "Deploy" button: this app reads one team's MLflow
    ]


def start_dashboard(
    port: int, tracking_uri: str, host: str = "127.0.0.1", timeout: float = 60, log_path: Path | None = None
) -> DashboardProcess:
    """Start the dashboard and return once it answers its health check."""
    if not APP_PATH.is_file():
        raise ClusterError(f"dashboard app not found at {APP_PATH}")
    if port_in_use(port, "127.0.0.1" if host in ("0.0.0.0", "") else host):
        raise ClusterError(f"port {port} is already in use; choose another with --port")
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri}
    out = log_path.open("ab") if log_path else None
    proc = subprocess.Popen(
        streamlit_command(port, host), env=env, cwd=PROJECT_ROOT, stdout=out, stderr=subprocess.STDOUT if out else None
    )
    probe_host = "127.0.0.1" if host in ("0.0.0.0", "") else host
    url = f"http://{probe_host}:{port}"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            where = f" (log: {log_path})" if log_path else ""
            raise ClusterError(f"streamlit exited with code {proc.returncode} before serving {url}{where}")
        try:
            if httpx.get(f"{url}/_stcore/health", timeout=2).status_code == 200:
                return DashboardProcess(url, proc)
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    DashboardProcess(url, proc).stop()
    raise ClusterError(f"dashboard did not answer on {url} within {timeout:.0f}s")


def launch(port: int, tracking_uri: str, host: str = "127.0.0.1") -> None:
    """Run the dashboard in the foreground until it exits or the user presses Ctrl-C."""
    dash = start_dashboard(port, tracking_uri, host)
    print(f"dashboard: {dash.url}  (MLflow: {tracking_uri}; Ctrl-C to stop)", flush=True)
    try:
        code = dash.wait()
    except KeyboardInterrupt:
        code = 0
    finally:
        dash.stop()
    if code not in (0, -15):
        raise ClusterError(f"streamlit exited with code {code}")
