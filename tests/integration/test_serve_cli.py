"""`loraforge serve SPEC` as a user runs it: serves until interrupted, then exits cleanly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from lab_adapters import make_random_adapter
from openai import OpenAI

from loraforge.cluster import free_port, port_in_use


def test_serve_command_serves_until_interrupted(lab, mlflow_server, tmp_path):
    adapter = make_random_adapter(lab.model_dir, tmp_path / "adapter", seed=3)
    port = free_port()
    spec = tmp_path / "serve.yaml"
    spec.write_text(f"kind: serve\nport: {port}\nadapters:\n  - {{name: shop, path: {adapter}}}\n")
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen([str(Path(sys.executable).parent / "loraforge"), "serve", str(spec),
                             "--mlflow-uri", mlflow_server], stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ}, start_new_session=True)
    try:
        deadline = time.time() + 240
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=30)
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
        proc.send_signal(signal.SIGINT)
        # 130 is the shell's code for "ended by Ctrl-C"; a crash would be 1, a user error 2.
        assert proc.wait(timeout=120) in (0, 130), (tmp_path / "serve.log").read_text()[-3000:]
        assert "Deleting app ['loraforge']" in (tmp_path / "serve.log").read_text()
        assert not port_in_use(port), "the port must be released after shutdown"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
