"""`loraforge serve SPEC` and `loraforge adapters ...` as a user runs them: the service runs until
interrupted, adapters are listed, added and removed through the CLI, and the deployment files are
generated from the same spec."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml
from lab_adapters import make_random_adapter
from openai import OpenAI

from loraforge.cluster import free_port, port_in_use

LORAFORGE = str(Path(sys.executable).parent / "loraforge")
ADMIN_KEY = "cli-admin-key-123"


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([LORAFORGE, *args], capture_output=True, text=True, timeout=300, env=env)


def test_emit_serve_config_and_rayservice_without_a_cluster(tmp_path):
    from ray.serve.schema import ServeDeploySchema

    spec = tmp_path / "serve.yaml"
    spec.write_text("kind: serve\nport: 8100\nautoscaling: {min_replicas: 1, max_replicas: 3}\n"
                    "api_keys: [{key_env: LF_KEY, admin: true}]\n")
    res = cli("serve", str(spec), "--emit-serve-config", str(tmp_path / "cfg.yaml"),
              "--emit-rayservice", str(tmp_path / "rs.yaml"), "--image", "example/loraforge:1")
    assert res.returncode == 0, res.stderr
    cfg = ServeDeploySchema.model_validate(yaml.safe_load((tmp_path / "cfg.yaml").read_text()))
    assert cfg.http_options.port == 8100 and cfg.applications[0].args["autoscaling"]["max_replicas"] == 3
    rs = yaml.safe_load((tmp_path / "rs.yaml").read_text())
    assert rs["kind"] == "RayService" and "example/loraforge:1" in (tmp_path / "rs.yaml").read_text()
    assert yaml.safe_load(rs["spec"]["serveConfigV2"])["applications"] == yaml.safe_load(
        (tmp_path / "cfg.yaml").read_text())["applications"]
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: serve\nnum_replicas: 2\nautoscaling: {max_replicas: 3}\n")
    res = cli("serve", str(bad), "--emit-serve-config", str(tmp_path / "x.yaml"))
    assert res.returncode == 2 and "num_replicas or autoscaling" in res.stderr


def test_serve_command_serves_and_administers_adapters_until_interrupted(lab, mlflow_server, tmp_path):
    adapter = make_random_adapter(lab.model_dir, tmp_path / "adapter", seed=3)
    extra = make_random_adapter(lab.model_dir, tmp_path / "extra", seed=4)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    spec = tmp_path / "serve.yaml"
    spec.write_text(f"kind: serve\nport: {port}\nadapters:\n  - {{name: shop, path: {adapter}}}\n"
                    "api_keys: [{key_env: LF_CLI_ADMIN_KEY, admin: true}]\n")
    env = {**os.environ, "LF_CLI_ADMIN_KEY": ADMIN_KEY}
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen([LORAFORGE, "serve", str(spec), "--mlflow-uri", mlflow_server], stdout=log,
                            stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.time() + 240
        client = OpenAI(base_url=f"{url}/v1", api_key=ADMIN_KEY, max_retries=0, timeout=30)
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            assert time.time() < deadline, "the service did not come up"
            if port_in_use(port):
                try:
                    names = [m.id for m in client.models.list().data]
                    break
                except Exception:  # noqa: BLE001 - the proxy answers before the app is deployed
                    pass
            time.sleep(2)
        assert names == ["lab", "shop"]
        done = client.completions.create(model="shop", prompt="The", max_tokens=4, temperature=0)
        assert done.choices[0].text and done.usage.completion_tokens >= 1

        admin_env = {**os.environ, "LORAFORGE_API_KEY": ADMIN_KEY}
        res = cli("adapters", "add", "extra", str(extra), "--url", url, "--pin", env=admin_env)
        assert res.returncode == 0 and "added extra (resident" in res.stdout, res.stdout + res.stderr
        res = cli("adapters", "list", "--url", f"{url}/v1", env=admin_env)
        assert res.returncode == 0 and "shop" in res.stdout and "extra" in res.stdout, res.stderr
        assert client.completions.create(model="extra", prompt="The", max_tokens=2).usage.completion_tokens >= 1
        res = cli("adapters", "remove", "extra", "--url", url, "--api-key", ADMIN_KEY)
        assert res.returncode == 0 and "removed extra" in res.stdout, res.stderr
        assert [m.id for m in client.models.list().data] == ["lab", "shop"]
        # Errors exit 2 with the service's message.
        res = cli("adapters", "remove", "extra", "--url", url, env=admin_env)
        assert res.returncode == 2 and "HTTP 404" in res.stderr and "extra" in res.stderr
        res = cli("adapters", "list", "--url", url, "--api-key", "wrong")
        assert res.returncode == 2 and "HTTP 401" in res.stderr

        proc.send_signal(signal.SIGINT)
        # 130 is the shell's code for "ended by Ctrl-C"; a crash would be 1, a user error 2.
        assert proc.wait(timeout=120) in (0, 130), (tmp_path / "serve.log").read_text()[-3000:]
        assert "Deleting app ['loraforge']" in (tmp_path / "serve.log").read_text()
        assert not port_in_use(port), "the port must be released after shutdown"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
