"""One serve spec, three ways to run it: `loraforge serve` (start_service), a Serve config YAML for
`serve deploy`, and a KubeRay RayService manifest. All three go through the same application builder,
`loraforge.serve.deployment:build_application`, with the same `ServeAppArgs`.

Secrets never land in a generated file: a key given by `key_env` stays an environment variable name
(resolved on each replica; the RayService maps it from a Kubernetes Secret), a literal key is written
as its SHA-256 digest. This module imports neither Ray nor torch.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field

from loraforge.errors import SpecError
from loraforge.serve.auth import ApiKeyArg, key_digest
from loraforge.spec import LAB_MODEL, ApiKeySpec, ServeSpec

APP_NAME = "loraforge"
SERVER_DEPLOYMENT = "LoraforgeServer"
REGISTRY_DEPLOYMENT = "AdapterRegistry"
IMPORT_PATH = "loraforge.serve.deployment:build_application"
RAY_VERSION = "2.60.0"
DEFAULT_IMAGE = "loraforge:latest"
SERVE_PORT = 8000  # KubeRay's serve Service targets this container port
MAX_ONGOING_PER_BATCH_SLOT = 2  # a replica keeps a full batch running plus as many queued to refill it


class AdapterSourceArg(BaseModel):
    """One adapter as deployment arguments carry it."""

    model_config = ConfigDict(extra="forbid")

    name: str
    source: str  # a folder or an MLflow URI (runs:/..., models:/...)
    pin: bool = False


class AutoscalingArg(BaseModel):
    model_config = ConfigDict(extra="forbid")

    min_replicas: int
    max_replicas: int
    target_ongoing_requests: float


class ServeAppArgs(BaseModel):
    """The application builder's arguments: everything a replica needs, and the deployment options."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="'lab', a local model folder or a hub id, resolved on each replica")
    base_name: str = Field(description="the base model's name in /v1/models")
    adapters: list[AdapterSourceArg] = []
    adapter_dir: str | None = None
    pinned: list[str] = []
    api_keys: list[ApiKeyArg] = []
    max_batch_size: int = 32
    max_new_tokens_limit: int = 256
    max_len: int | None = None
    cache_bytes: int | None = None
    num_replicas: int | None = None
    autoscaling: AutoscalingArg | None = None
    replica_cpus: float = 0.5

    def deployment_options(self) -> dict[str, Any]:
        """Options for the model-server deployment (`Deployment.options(**...)`)."""
        options: dict[str, Any] = {
            "max_ongoing_requests": MAX_ONGOING_PER_BATCH_SLOT * self.max_batch_size,
            "ray_actor_options": {"num_cpus": self.replica_cpus},
        }
        if self.autoscaling is not None:
            options["autoscaling_config"] = self.autoscaling.model_dump()
        else:
            options["num_replicas"] = self.num_replicas or 1
        return options


def served_base_name(model_ref: str) -> str:
    """The base model's name in /v1/models: 'lab', a hub id, or a local folder's name."""
    if model_ref == LAB_MODEL:
        return model_ref
    path = Path(model_ref).expanduser()
    return path.resolve().name if path.exists() else model_ref


def _key_arg(i: int, k: ApiKeySpec, secrets: Literal["digest", "env"]) -> ApiKeyArg:
    label = k.name or k.key_env or f"key{i}"
    common = {"name": label, "adapters": k.adapters, "admin": k.admin}
    if k.key is not None:
        return ApiKeyArg(key_sha256=key_digest(k.key), **common)
    if secrets == "env":
        return ApiKeyArg(key_env=k.key_env, **common)
    value = os.environ.get(str(k.key_env))
    if not value:
        raise SpecError("serve", [(f"api_keys.{i}", f"environment variable {k.key_env} is not set")])
    return ApiKeyArg(key_sha256=key_digest(value), **common)


def app_args(spec: ServeSpec, model_ref: str, secrets: Literal["digest", "env"] = "env",
             base_name: str | None = None) -> ServeAppArgs:
    """The builder's arguments for `spec` serving `model_ref`. secrets="digest" reads `key_env` variables
    here (a local start, whose replicas may not see this shell's environment); "env" leaves them to the
    replicas (generated configs)."""
    pinned = set(spec.pinned)
    autoscaling = None if spec.autoscaling is None else AutoscalingArg(**spec.autoscaling.model_dump())
    return ServeAppArgs(
        model=model_ref,
        base_name=base_name or served_base_name(model_ref),
        adapters=[AdapterSourceArg(name=a.name, source=a.path, pin=a.pin or a.name in pinned) for a in spec.adapters],
        adapter_dir=spec.adapter_dir,
        pinned=sorted(pinned),
        api_keys=[_key_arg(i, k, secrets) for i, k in enumerate(spec.api_keys)],
        max_batch_size=spec.max_batch_size,
        max_new_tokens_limit=spec.max_new_tokens_limit,
        max_len=spec.max_len,
        cache_bytes=spec.cache_bytes,
        num_replicas=None if autoscaling else spec.num_replicas,
        autoscaling=autoscaling,
        replica_cpus=spec.replica_cpus,
    )


def application_config(args: ServeAppArgs) -> dict[str, Any]:
    """One entry of a Serve config's `applications` list."""
    return {
        "name": APP_NAME,
        "route_prefix": "/",
        "import_path": IMPORT_PATH,
        "args": args.model_dump(mode="json", exclude_none=True),
    }


def serve_config(spec: ServeSpec, model_ref: str) -> dict[str, Any]:
    """A Serve config for `serve deploy FILE` (validates as ray.serve.schema.ServeDeploySchema)."""
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": spec.host, "port": spec.port},
        "applications": [application_config(app_args(spec, model_ref))],
    }


def _secret_env(spec: ServeSpec, secret_name: str) -> list[dict[str, Any]]:
    return [
        {"name": k.key_env, "valueFrom": {"secretKeyRef": {"name": secret_name, "key": k.key_env}}}
        for k in spec.api_keys if k.key_env is not None
    ]


def _container(name: str, image: str, env: list[dict[str, Any]], ports: list[dict[str, Any]],
               cpu: str, memory: str) -> dict[str, Any]:
    base_env = [
        {"name": "MLFLOW_TRACKING_URI", "value": "http://mlflow:5000"},
        {"name": "LORAFORGE_HOME", "value": "/app/.loraforge"},
        {"name": "TOKENIZERS_PARALLELISM", "value": "false"},
        {"name": "HF_HUB_OFFLINE", "value": "1"},
    ]
    container: dict[str, Any] = {
        "name": name, "image": image, "imagePullPolicy": "IfNotPresent", "env": base_env + env,
        "resources": {"requests": {"cpu": cpu, "memory": memory}, "limits": {"cpu": cpu, "memory": memory}},
        "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}],
    }
    if ports:
        container["ports"] = ports
    return container


def _pod(container: dict[str, Any], component: str, shm: str) -> dict[str, Any]:
    return {
        "metadata": {"labels": {"app.kubernetes.io/name": "loraforge", "app.kubernetes.io/component": component}},
        "spec": {"containers": [container],
                 "volumes": [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": shm}}]},
    }


def rayservice(spec: ServeSpec, model_ref: str, *, name: str = APP_NAME, image: str = DEFAULT_IMAGE,
               api_key_secret: str | None = None, max_workers: int = 4) -> dict[str, Any]:
    """A KubeRay RayService: the cluster (head without compute, an autoscaling CPU worker group) and the
    Serve application as serveConfigV2. API keys given by `key_env` come from the Secret `api_key_secret`
    (default NAME-api-keys), one entry per variable name."""
    args = app_args(spec, model_ref)
    # The proxy listens on SERVE_PORT on every pod; KubeRay's serve Service fronts it.
    serve_cfg = {"proxy_location": "EveryNode", "applications": [application_config(args)]}
    env = _secret_env(spec, api_key_secret or f"{name}-api-keys")
    head_ports = [{"name": "gcs-server", "containerPort": 6379}, {"name": "dashboard", "containerPort": 8265},
                  {"name": "client", "containerPort": 10001}, {"name": "serve", "containerPort": SERVE_PORT}]
    replicas = args.autoscaling.max_replicas if args.autoscaling else int(args.num_replicas or 1)
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": {"name": name, "labels": {"app.kubernetes.io/name": "loraforge",
                                              "app.kubernetes.io/part-of": "loraforge"}},
        "spec": {
            "serveConfigV2": yaml.safe_dump(serve_cfg, sort_keys=False),
            "rayClusterConfig": {
                "rayVersion": RAY_VERSION,
                "authOptions": {"mode": "token"},
                "enableInTreeAutoscaling": True,
                "autoscalerOptions": {"version": "v2", "upscalingMode": "Default", "idleTimeoutSeconds": 120},
                "headGroupSpec": {
                    # The head runs the GCS, the Serve controller and a proxy; replicas land on workers.
                    "rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0"},
                    "template": _pod(_container("ray-head", image, env, head_ports, "1", "4Gi"), "ray-head", "1Gi"),
                },
                "workerGroupSpecs": [{
                    "groupName": "cpu",
                    "replicas": 1,
                    "minReplicas": 0,
                    # Enough pods for the most replicas the spec asks for (2 CPUs per pod).
                    "maxReplicas": max(max_workers, -(-int(replicas * args.replica_cpus) // 2)),
                    "rayStartParams": {},
                    "template": _pod(_container("ray-worker", image, env, [{"name": "serve",
                                                                            "containerPort": SERVE_PORT}],
                                                "2", "8Gi"), "ray-worker", "2Gi"),
                }],
            },
        },
    }


class _BlockDumper(yaml.SafeDumper):
    """Multi-line strings (serveConfigV2) as readable `|` blocks."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_BlockDumper.add_representer(str, _str)


def to_yaml(doc: dict[str, Any]) -> str:
    return yaml.dump(doc, Dumper=_BlockDumper, sort_keys=False)


def write_yaml(doc: dict[str, Any], path: str | Path, header: str = "") -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(header + to_yaml(doc))
    return path
