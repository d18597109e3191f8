"""k8s/ manifests against the KubeRay CRD schemas, and against the repo they deploy.

The API server validates a custom resource with the CRD's `openAPIV3Schema`; with strict field
validation (kubectl's default `--validate=strict`) it also rejects unknown fields. `strict_schema`
reproduces that for jsonschema by closing every object schema that lists its properties.
CEL rules (`x-kubernetes-validations`) are not evaluated here; a test checks we set no field that has one.
"""

from __future__ import annotations

import copy
import os
import re
import shlex
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from loraforge.paths import PROJECT_ROOT, shared_data_dir

K8S = PROJECT_ROOT / "k8s"
DOCKERFILE = PROJECT_ROOT / "infra" / "Dockerfile"
IMAGE = "loraforge:latest"
Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are megabytes of YAML


def crd_dir() -> Path:
    """KubeRay CRDs shipped beside the project (LORAFORGE_SHARED_K8S: the k8s folder or kuberay-crds)."""
    env = os.environ.get("LORAFORGE_SHARED_K8S")
    base = Path(env) if env else shared_data_dir(required=False).parent / "k8s"
    path = base if (base / "ray.io_rayjobs.yaml").is_file() else base / "kuberay-crds"
    if not (path / "ray.io_rayjobs.yaml").is_file():
        pytest.fail(f"KubeRay CRDs not found in {path}: set LORAFORGE_SHARED_K8S to the folder holding "
                    "ray.io_rayclusters.yaml and ray.io_rayjobs.yaml")
    return path


def strict_schema(schema: Any) -> Any:
    """Copy of a structural schema in which objects with declared properties allow no other keys."""
    if isinstance(schema, list):
        return [strict_schema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict_schema(v) if k in ("properties", "items", "additionalProperties", "anyOf", "allOf",
                                        "oneOf", "not") else v for k, v in schema.items()}
    if "properties" in out:
        out["properties"] = {k: strict_schema(v) for k, v in schema["properties"].items()}
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


@cache
def crd_schema(kind: str) -> dict[str, Any]:
    fname = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml"}[kind]
    crd = yaml.load((crd_dir() / fname).read_text(), Loader=Loader)
    assert crd["spec"]["names"]["kind"] == kind
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return v1["schema"]["openAPIV3Schema"]


@cache
def validator(kind: str) -> jsonschema.Draft4Validator:
    # OpenAPI 3.0 schemas are closest to draft 4 (e.g. boolean exclusiveMinimum).
    schema = strict_schema(crd_schema(kind))
    jsonschema.Draft4Validator.check_schema(schema)
    return jsonschema.Draft4Validator(schema)


def schema_errors(manifest: dict[str, Any]) -> list[str]:
    errors = validator(manifest["kind"]).iter_errors(manifest)
    return sorted(f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors)


def load(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]


def one(name: str, kind: str) -> dict[str, Any]:
    (doc,) = [d for d in load(name) if d["kind"] == kind]
    return doc


def raycluster() -> dict[str, Any]:
    return one("raycluster.yaml", "RayCluster")


def rayjob() -> dict[str, Any]:
    return one("rayjob.yaml", "RayJob")


def containers(cluster_spec: dict[str, Any]) -> list[dict[str, Any]]:
    groups = [cluster_spec["headGroupSpec"], *cluster_spec.get("workerGroupSpecs", [])]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def dockerfile_workdir() -> str:
    workdirs = re.findall(r"^WORKDIR\s+(\S+)", DOCKERFILE.read_text(), flags=re.M)
    assert workdirs, "infra/Dockerfile sets no WORKDIR"
    return workdirs[-1]


# -- schema validation ------------------------------------------------------------------------------


@pytest.mark.parametrize("manifest", ["raycluster", "rayjob"])
def test_manifest_matches_kuberay_crd(manifest):
    doc = {"raycluster": raycluster, "rayjob": rayjob}[manifest]()
    assert doc["apiVersion"] == "ray.io/v1"
    assert schema_errors(doc) == []


def _worker(doc):
    return doc["spec"]["workerGroupSpecs"][0]


BREAKAGES = {
    "misspelled key": (lambda d: _worker(d).update(maxReplica=_worker(d).pop("maxReplicas")),
                       "'maxReplica' was unexpected"),
    "misspelled container key": (
        lambda d: _worker(d)["template"]["spec"]["containers"][0].update(imagePulPolicy="Always"),
        "'imagePulPolicy' was unexpected",
    ),
    "int where rayStartParams wants a string": (
        lambda d: d["spec"]["headGroupSpec"]["rayStartParams"].update({"num-cpus": 0}),
        "is not of type 'string'",
    ),
    "string where an integer is required": (lambda d: _worker(d).update(maxReplicas="4"), "is not of type"),
    "missing required groupName": (lambda d: _worker(d).pop("groupName"), "'groupName' is a required"),
    "unknown autoscaler mode": (
        lambda d: d["spec"]["autoscalerOptions"].update(upscalingMode="Fast"),
        "is not one of",
    ),
}


@pytest.mark.parametrize("breakage", list(BREAKAGES))
def test_validator_rejects_broken_raycluster(breakage):
    doc = copy.deepcopy(raycluster())
    mutate, expected = BREAKAGES[breakage]
    mutate(doc)
    errors = schema_errors(doc)
    assert errors, f"{breakage} was accepted"
    assert any(expected in e for e in errors), errors


def test_validator_rejects_misspelled_rayjob_field():
    doc = copy.deepcopy(rayjob())
    doc["spec"]["shutdownAfterJobFinish"] = doc["spec"].pop("shutdownAfterJobFinishes")
    assert any("'shutdownAfterJobFinish' was unexpected" in e for e in schema_errors(doc))


def _cel_paths(schema: dict[str, Any], doc: Any, path: str = "") -> list[str]:
    """Fields set in `doc` whose schema carries CEL rules (which jsonschema cannot evaluate)."""
    found = [path] if schema.get("x-kubernetes-validations") else []
    if isinstance(doc, dict):
        for key, value in doc.items():
            if key in schema.get("properties", {}):
                found += _cel_paths(schema["properties"][key], value, f"{path}.{key}")
    elif isinstance(doc, list) and "items" in schema:
        for i, item in enumerate(doc):
            found += _cel_paths(schema["items"], item, f"{path}[{i}]")
    return found


@pytest.mark.parametrize("kind", ["RayCluster", "RayJob"])
def test_manifests_set_no_field_with_unchecked_cel_rules(kind):
    doc = raycluster() if kind == "RayCluster" else rayjob()
    assert _cel_paths(crd_schema(kind), doc) == []


# -- consistency with the repo ----------------------------------------------------------------------


def test_rayjob_entrypoint_runs_repo_files_shipped_in_image():
    entry = rayjob()["spec"]["entrypoint"]
    assert not set("&|;`$<>") & set(entry), "keep the entrypoint one command: the submitter would run the rest"
    argv = shlex.split(entry)
    assert argv[0] == "python" and argv[1].endswith("ray_jobs/pipeline.py"), argv
    workdir = dockerfile_workdir().rstrip("/") + "/"
    copied = re.findall(r"^COPY\s+(?:--\S+\s+)*(\S+)/?\s", DOCKERFILE.read_text(), flags=re.M)
    copied = {c.rstrip("/") for c in copied}
    for arg in argv[1:]:
        rel = arg.removeprefix(workdir)
        assert (PROJECT_ROOT / rel).is_file(), f"entrypoint names {arg}, but {rel} is not in the repo"
        assert rel.split("/")[0] in copied, f"infra/Dockerfile does not COPY {rel.split('/')[0]}/"


def test_rayjob_job_file_is_a_valid_pipeline():
    from loraforge.spec import load_spec

    job_file = shlex.split(rayjob()["spec"]["entrypoint"])[2].removeprefix(dockerfile_workdir().rstrip("/") + "/")
    spec = load_spec(PROJECT_ROOT / job_file)
    assert type(spec).__name__ == "PipelineSpec"


def test_images_match_the_tag_the_docs_build():
    builds = []
    for doc in ("README.md", "Makefile"):
        text = (PROJECT_ROOT / doc).read_text() if (PROJECT_ROOT / doc).is_file() else ""
        builds += re.findall(r"docker build\s[^\n]*-f\s+infra/Dockerfile[^\n]*", text)
    assert builds, "neither README.md nor Makefile shows `docker build -f infra/Dockerfile -t ...`"
    tags = {re.search(r"-t\s+(\S+)", b).group(1) for b in builds}
    assert tags == {IMAGE}

    images = [c["image"] for c in containers(raycluster()["spec"])]
    images += [c["image"] for c in containers(rayjob()["spec"]["rayClusterSpec"])]
    images += [c["image"] for d in load("mlflow.yaml") if d["kind"] == "Deployment"
               for c in d["spec"]["template"]["spec"]["containers"]]
    assert images and set(images) == {IMAGE}


def test_rayjob_cluster_is_the_raycluster():
    cluster = raycluster()["spec"]
    job_cluster = rayjob()["spec"]["rayClusterSpec"]
    assert job_cluster["workerGroupSpecs"] == cluster["workerGroupSpecs"]
    assert job_cluster == cluster  # one cluster shape: a RayJob reproduces what the RayCluster runs
    assert rayjob()["spec"]["shutdownAfterJobFinishes"] is True


def test_raycluster_autoscales_cpu_workers():
    spec = raycluster()["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["rayVersion"] == "2.60.0"
    (workers,) = spec["workerGroupSpecs"]
    assert workers["minReplicas"] <= workers["replicas"] <= workers["maxReplicas"]
    assert workers["maxReplicas"] > workers["minReplicas"]
    limits = workers["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert "nvidia.com/gpu" not in limits


def test_mlflow_pod_template_matches_the_kubernetes_pod_schema():
    """No Deployment schema ships here, but the CRDs embed the core PodTemplateSpec schema: use it."""
    pod_schema = crd_schema("RayCluster")["properties"]["spec"]["properties"]["headGroupSpec"]["properties"]
    pod_validator = jsonschema.Draft4Validator(strict_schema(pod_schema["template"]))
    (deploy,) = [d for d in load("mlflow.yaml") if d["kind"] == "Deployment"]
    template = deploy["spec"]["template"]
    assert [e.message for e in pod_validator.iter_errors(template)] == []
    broken = copy.deepcopy(template)
    broken["spec"]["containers"][0]["readinessProbe"]["httpGet"]["header"] = []
    assert any("'header' was unexpected" in e.message for e in pod_validator.iter_errors(broken))


def test_ray_pods_reach_the_mlflow_service():
    from mlflow.server.security_utils import is_allowed_host_header

    docs = load("mlflow.yaml")
    (service,) = [d for d in docs if d["kind"] == "Service"]
    (deploy,) = [d for d in docs if d["kind"] == "Deployment"]
    (pvc,) = [d for d in docs if d["kind"] == "PersistentVolumeClaim"]
    port = service["spec"]["ports"][0]["port"]
    host = f"{service['metadata']['name']}:{port}"

    for spec in (raycluster()["spec"], rayjob()["spec"]["rayClusterSpec"]):
        for c in containers(spec):
            env = {e["name"]: e.get("value") for e in c.get("env", [])}
            assert env.get("MLFLOW_TRACKING_URI") == f"http://{host}", c["name"]

    pod = deploy["spec"]["template"]
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    (server,) = pod["spec"]["containers"]
    args = server["command"] + server["args"]
    allowed = next(a.split("=", 1)[1] for a in args if a.startswith("--allowed-hosts=")).split(",")
    for h in (host, f"{host.split(':')[0]}.loraforge.svc.cluster.local:{port}", "localhost:5000"):
        assert is_allowed_host_header(allowed, h), h
    assert not is_allowed_host_header(allowed, "evil.example.com")
    assert any(a.startswith("--backend-store-uri=sqlite:////") for a in args)
    env = {e["name"]: e["value"] for e in server["env"]}
    assert env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    claims = [v["persistentVolumeClaim"]["claimName"] for v in pod["spec"]["volumes"]
              if "persistentVolumeClaim" in v]
    assert claims == [pvc["metadata"]["name"]]
