"""Adapter sources against the session's real MLflow server: runs:/ and models:/ (version and alias) resolve to
byte-identical adapter folders, downloads are atomic and reused, and failures name the source and the cause."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
from mlflow import MlflowClient

from loraforge.errors import ModelError
from loraforge.serve.adapter_sources import resolve_adapter_source, scan_adapter_dir


def write_adapter(folder: Path, seed: int = 0) -> Path:
    """A small real PEFT-format folder (config + safetensors), enough for check_adapter_dir and byte checks."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4}))
    g = torch.Generator().manual_seed(seed)
    save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.randn(2, 8, generator=g)},
              str(folder / "adapter_model.safetensors"))
    (folder / "README.md").write_text(f"adapter {seed}\n")
    return folder


def same_files(a: Path, b: Path) -> bool:
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    return files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file()) and all(
        (a / f).read_bytes() == (b / f).read_bytes() for f in files)


@pytest.fixture(scope="module")
def logged(mlflow_server, tmp_path_factory):
    """One run holding the adapter under artifacts/adapter (and a non-adapter folder), registered as a model
    version with an alias."""
    root = tmp_path_factory.mktemp("sources")
    adapter = write_adapter(root / "adapter", seed=1)
    client = MlflowClient(mlflow_server)
    experiment = client.create_experiment(f"adapter-sources-{uuid.uuid4().hex[:8]}")
    run = client.create_run(experiment)
    client.log_artifacts(run.info.run_id, str(adapter), "adapter")
    (root / "notes").mkdir()
    (root / "notes" / "a.txt").write_text("not an adapter")
    client.log_artifacts(run.info.run_id, str(root / "notes"), "notes")
    client.set_terminated(run.info.run_id)
    name = f"lab-adapter-{uuid.uuid4().hex[:8]}"
    client.create_registered_model(name)
    # MLflow 3's register_model wants a logged model; a plain artifact folder is registered from its URI
    version = client.create_model_version(name, source=f"{run.info.artifact_uri}/adapter", run_id=run.info.run_id)
    client.set_registered_model_alias(name, "prod", version.version)
    return {"adapter": adapter, "run_id": run.info.run_id, "name": name, "version": version.version}


def test_runs_and_models_sources_download_byte_identical_folders(logged, mlflow_server, tmp_path):
    sources = [f"runs:/{logged['run_id']}/adapter", f"models:/{logged['name']}/{logged['version']}",
               f"models:/{logged['name']}@prod"]
    folders = [resolve_adapter_source(s, tmp_path, mlflow_server) for s in sources]
    assert len(set(folders)) == 3 and all(f.parent == tmp_path for f in folders)
    for source, folder in zip(sources, folders, strict=True):
        assert same_files(logged["adapter"], folder), source
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".partial-")]
    # a complete download is reused: no server needed the second time
    assert resolve_adapter_source(sources[0], tmp_path, "http://127.0.0.1:9") == folders[0]


@pytest.mark.parametrize(("source", "message"), [
    ("runs:/0123456789abcdef/adapter", "Run with id=0123456789abcdef not found"),
    ("RUN/missing", "no artifact 'missing' there"),
    ("models:/no-such-adapter-model/1", "name=no-such-adapter-model not found"),
    ("RUN/notes", "is not a usable adapter"),
    ("models:/only-a-name", "expected models:/<name>/<version> or models:/<name>@<alias>"),
    ("runs:/just-a-run-id", "expected runs:/<run_id>/<artifact path"),
])
def test_failures_name_the_source_and_the_cause(logged, mlflow_server, tmp_path, source, message):
    source = source.replace("RUN", f"runs:/{logged['run_id']}")
    with pytest.raises(ModelError, match=message) as info:
        resolve_adapter_source(source, tmp_path, mlflow_server)
    assert repr(source) in str(info.value)
    assert not list(tmp_path.iterdir())  # nothing half-downloaded stays


def test_unreachable_server_and_missing_tracking_uri(tmp_path, monkeypatch):
    with pytest.raises(ModelError, match="'models:/x/1': no MLflow server reachable at http://127.0.0.1:9"):
        resolve_adapter_source("models:/x/1", tmp_path, "http://127.0.0.1:9")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(ModelError, match="no MLflow tracking server given"):
        resolve_adapter_source("models:/x/1", tmp_path)


def test_local_folders_are_used_in_place(tmp_path):
    adapter = write_adapter(tmp_path / "a")
    assert resolve_adapter_source(str(adapter), tmp_path / "dl") == adapter.resolve()
    assert resolve_adapter_source(adapter.resolve().as_uri(), tmp_path / "dl") == adapter.resolve()
    (adapter / "adapter_model.safetensors").rename(adapter / "adapter_model.bin")
    with pytest.raises(ModelError, match="pickle"):
        resolve_adapter_source(str(adapter), tmp_path / "dl")
    assert not (tmp_path / "dl").exists()


def test_scan_adapter_dir_names_adapters_by_folder(tmp_path):
    for name in ("beta", "alpha-1.v2", "Z_9"):
        write_adapter(tmp_path / name)
    (tmp_path / "not-an-adapter").mkdir()
    (tmp_path / "loose.txt").write_text("x")
    assert scan_adapter_dir(tmp_path) == {n: (tmp_path / n).resolve() for n in ("Z_9", "alpha-1.v2", "beta")}
    write_adapter(tmp_path / "-bad")
    with pytest.raises(ModelError, match=r"'-bad' is not allowed: names must match \[A-Za-z0-9\]"):
        scan_adapter_dir(tmp_path)
    with pytest.raises(ModelError, match="adapter directory not found"):
        scan_adapter_dir(tmp_path / "nope")
