"""One local Ray cluster and one real MLflow server (SQLite backend) for the whole session."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    from loraforge.cluster import free_port, start_mlflow_server

    server = start_mlflow_server(tmp_path_factory.mktemp("mlflow"), port=free_port())
    os.environ["MLFLOW_TRACKING_URI"] = server.uri
    yield server.uri
    server.stop()


@pytest.fixture(scope="session")
def ray_cluster(lab, mlflow_server):
    """Started after the lab is built so workers find the cached model instead of rebuilding it."""
    import ray

    from loraforge.cluster import LOCAL_RAY_CPUS

    env = {k: os.environ[k] for k in ("LORAFORGE_HOME", "MLFLOW_TRACKING_URI", "TOKENIZERS_PARALLELISM",
                                       "HF_HUB_OFFLINE", "LORAFORGE_SHARED_DATA") if k in os.environ}
    ray.init(num_cpus=LOCAL_RAY_CPUS, include_dashboard=True, runtime_env={"env_vars": env},
             logging_level="WARNING")
    yield ray
    ray.shutdown()
