"""The serve spec and what is generated from it: builder arguments, the Serve config YAML (checked with
Ray's own ServeDeploySchema and built into an application) and the KubeRay RayService (checked against
the CRD schema, strictly, like the other k8s manifests)."""

from __future__ import annotations

import copy
import re
from functools import cache
from typing import Any

import jsonschema
import pytest
import yaml
from test_k8s_manifests import K8S, Loader, crd_dir, raycluster, strict_schema

from loraforge.errors import SpecError
from loraforge.serve.auth import ApiKeyArg, KeyRing, key_digest
from loraforge.serve.serve_config import (
    APP_NAME,
    IMPORT_PATH,
    MAX_ONGOING_PER_BATCH_SLOT,
    ServeAppArgs,
    app_args,
    rayservice,
    serve_config,
    to_yaml,
)
from loraforge.spec import ServeSpec, parse_spec

SECRET = "s3cret-admin-key"


def spec(**fields: Any) -> ServeSpec:
    base: dict[str, Any] = {"kind": "serve", "adapters": [{"name": "shop", "path": "/adapters/shop"}]}
    return parse_spec(base | fields)


# -- the spec -----------------------------------------------------------------------------------------


def test_spec_defaults():
    s = spec()
    assert s.max_batch_size == 32 and s.num_replicas == 1 and s.autoscaling is None
    assert s.cache_bytes is None and s.api_keys == [] and s.adapter_dir is None


@pytest.mark.parametrize(
    ("fields", "problem"),
    [
        ({"num_replicas": 2, "autoscaling": {"max_replicas": 3}}, "num_replicas or autoscaling"),
        ({"autoscaling": {"min_replicas": 4, "max_replicas": 2}}, "exceeds max_replicas"),
        ({"autoscaling": {"max_replicas": 2, "target_ongoing_requests": 0}}, "autoscaling.target_ongoing_requests"),
        ({"api_keys": [{"name": "a"}]}, "exactly one of key_env"),
        ({"api_keys": [{"key_env": "A", "key": "abcdefgh12"}]}, "exactly one of key_env"),
        ({"api_keys": [{"key_env": "not a name"}]}, "api_keys.0.key_env"),
        ({"api_keys": [{"key": "short"}]}, "api_keys.0.key"),
        ({"api_keys": [{"name": "k", "key_env": "A"}, {"name": "k", "key_env": "B"}]}, "names must be unique"),
        ({"adapters": [{"name": "a", "path": "/x"}, {"name": "a", "path": "/y"}]}, "must be unique"),
        ({"adapters": [{"name": "bad name", "path": "/x"}]}, "adapters.0.name"),
        ({"max_batch_size": 0}, "max_batch_size"),
        ({"replicas": 2}, "replicas"),
    ],
)
def test_spec_rejects(fields, problem):
    with pytest.raises(SpecError) as info:
        spec(**fields)
    assert problem in str(info.value)


# -- builder arguments and keys -------------------------------------------------------------------------


def test_app_args_carry_the_spec(monkeypatch):
    s = spec(adapter_dir="/adapters", pinned=["shop", "extra"], cache_bytes=10_000_000, max_batch_size=8,
             autoscaling={"min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 4}, replica_cpus=1.5,
             max_len=512)
    a = app_args(s, "lab")
    assert a.base_name == "lab" and a.adapter_dir == "/adapters" and a.cache_bytes == 10_000_000
    assert a.max_len == 512 and app_args(spec(), "lab").max_len is None
    assert [(x.name, x.source, x.pin) for x in a.adapters] == [("shop", "/adapters/shop", True)]
    assert a.pinned == ["extra", "shop"]
    options = a.deployment_options()
    assert options == {
        "max_ongoing_requests": MAX_ONGOING_PER_BATCH_SLOT * 8,
        "ray_actor_options": {"num_cpus": 1.5},
        "autoscaling_config": {"min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 4.0},
    }
    assert app_args(spec(num_replicas=3), "lab").deployment_options()["num_replicas"] == 3


def test_keys_never_appear_in_generated_args(monkeypatch):
    s = spec(api_keys=[{"name": "admin", "key_env": "LF_ADMIN_KEY", "admin": True},
                       {"name": "shop", "key": "literal-shop-key", "adapters": ["shop"]}])
    env_args = app_args(s, "lab", secrets="env")
    assert [(k.key_env, k.key_sha256) for k in env_args.api_keys] == [
        ("LF_ADMIN_KEY", None), (None, key_digest("literal-shop-key"))]
    assert "literal-shop-key" not in to_yaml(serve_config(s, "lab"))

    # A local start resolves the variable where the spec is read: replicas get digests only.
    monkeypatch.delenv("LF_ADMIN_KEY", raising=False)
    with pytest.raises(SpecError, match="LF_ADMIN_KEY is not set"):
        app_args(s, "lab", secrets="digest")
    monkeypatch.setenv("LF_ADMIN_KEY", SECRET)
    digest_args = app_args(s, "lab", secrets="digest")
    assert digest_args.api_keys[0].key_sha256 == key_digest(SECRET) and digest_args.api_keys[0].key_env is None
    assert SECRET not in digest_args.model_dump_json()


def test_keyring_authenticates_and_restricts():
    ring = KeyRing.from_args(
        [ApiKeyArg(name="admin", key_env="LF_K", admin=True),
         ApiKeyArg(name="shop", key_sha256=key_digest("shop-key-123"), adapters=["shop"])],
        environ={"LF_K": SECRET},
    )
    assert ring.enabled and KeyRing().authenticate(None) is None  # no keys: open
    admin = ring.authenticate(f"Bearer {SECRET}")
    assert admin.name == "admin" and admin.admin and admin.may_use("anything", ["lab"])
    shop = ring.authenticate("bearer shop-key-123")
    assert shop.may_use("shop", ["lab"]) and shop.may_use("lab", ["lab"]) and not shop.may_use("other", ["lab"])
    for header in (None, "", "Bearer", "Bearer wrong", f"Basic {SECRET}"):
        with pytest.raises(Exception) as info:
            ring.authenticate(header)
        assert getattr(info.value, "status", None) == 401, header
    with pytest.raises(SpecError, match="LF_MISSING is not set"):
        KeyRing.from_args([ApiKeyArg(key_env="LF_MISSING")], environ={})


# -- Serve config YAML ------------------------------------------------------------------------------------


def test_serve_config_validates_with_serve_schema_and_builds():
    from ray.serve import Application
    from ray.serve.schema import ServeDeploySchema

    from loraforge.serve import deployment

    s = spec(port=8123, host="0.0.0.0", num_replicas=2, api_keys=[{"key_env": "LF_ADMIN_KEY", "admin": True}])
    doc = yaml.safe_load(to_yaml(serve_config(s, "lab")))  # through YAML text, as `serve deploy` reads it
    schema = ServeDeploySchema.model_validate(doc)
    assert schema.http_options.port == 8123 and schema.http_options.host == "0.0.0.0"
    (app,) = schema.applications
    assert app.name == APP_NAME and app.route_prefix == "/" and app.import_path == IMPORT_PATH

    module, attr = IMPORT_PATH.split(":")
    builder = getattr(__import__(module, fromlist=[attr]), attr)
    assert builder is deployment.build_application
    built = builder(app.args)
    assert isinstance(built, Application)
    assert ServeAppArgs.model_validate(app.args) == app_args(s, "lab")

    broken = copy.deepcopy(doc)
    broken["applications"][0]["args"]["num_replica"] = 2
    with pytest.raises(Exception, match="num_replica"):
        builder(broken["applications"][0]["args"])


# -- KubeRay RayService -----------------------------------------------------------------------------------


@cache
def rayservice_validator() -> jsonschema.Draft4Validator:
    crd = yaml.load((crd_dir() / "ray.io_rayservices.yaml").read_text(), Loader=Loader)
    assert crd["spec"]["names"]["kind"] == "RayService"
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return jsonschema.Draft4Validator(strict_schema(v1["schema"]["openAPIV3Schema"]))


def rayservice_errors(doc: dict[str, Any]) -> list[str]:
    errors = rayservice_validator().iter_errors(doc)
    return sorted(f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in errors)


EXAMPLE = K8S / "rayservice.yaml"


def example_spec() -> ServeSpec:
    """k8s/rayservice.yaml says in its header which serve spec it was generated from."""
    text = EXAMPLE.read_text()
    block = re.search(r"^# --- serve spec ---\n(.*?)^# ---$", text, flags=re.M | re.S)
    assert block, f"{EXAMPLE} has no '# --- serve spec ---' header"
    spec_yaml = "\n".join(line.removeprefix("# ").removeprefix("#") for line in block.group(1).splitlines())
    return parse_spec(yaml.safe_load(spec_yaml))


def test_example_rayservice_is_generated_from_its_spec_and_valid():
    docs = [d for d in yaml.safe_load_all(EXAMPLE.read_text()) if d]
    (doc,) = docs
    assert doc == rayservice(example_spec(), "lab"), "regenerate k8s/rayservice.yaml (see its header)"
    assert rayservice_errors(doc) == []


def test_rayservice_validates_and_carries_the_serve_config():
    from ray.serve.schema import ServeDeploySchema

    s = spec(autoscaling={"min_replicas": 1, "max_replicas": 6, "target_ongoing_requests": 8},
             api_keys=[{"key_env": "LF_ADMIN_KEY", "admin": True}, {"key": "literal-key-1"}])
    doc = yaml.safe_load(to_yaml(rayservice(s, "lab", image="registry.example/loraforge:1")))
    assert rayservice_errors(doc) == []
    serve_cfg = yaml.safe_load(doc["spec"]["serveConfigV2"])
    (app,) = ServeDeploySchema.model_validate(serve_cfg).applications
    assert ServeAppArgs.model_validate(app.args) == app_args(s, "lab")
    assert "literal-key-1" not in to_yaml(doc)

    cluster = doc["spec"]["rayClusterConfig"]
    reference = raycluster()["spec"]  # the project's RayCluster: the same shape, so one image serves both
    assert cluster["rayVersion"] == reference["rayVersion"] and cluster["authOptions"] == reference["authOptions"]
    assert cluster["headGroupSpec"]["rayStartParams"] == reference["headGroupSpec"]["rayStartParams"]
    containers = [cluster["headGroupSpec"]["template"]["spec"]["containers"][0],
                  cluster["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]]
    for c in containers:
        assert c["image"] == "registry.example/loraforge:1"
        env = {e["name"]: e for e in c["env"]}
        assert env["LF_ADMIN_KEY"]["valueFrom"] == {"secretKeyRef": {"name": "loraforge-api-keys",
                                                                     "key": "LF_ADMIN_KEY"}}
        assert any(p["containerPort"] == 8000 for p in c["ports"])
    assert cluster["workerGroupSpecs"][0]["maxReplicas"] >= 3  # 6 replicas x 0.5 CPU on 2-CPU pods


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda d: d["spec"].update(serveConfigV2={"applications": []}), "is not of type 'string'"),
        (lambda d: d["spec"].update(serveConfig=d["spec"]["serveConfigV2"]), "'serveConfig' was unexpected"),
        (lambda d: d["spec"]["rayClusterConfig"]["workerGroupSpecs"][0].update(maxReplicas="4"), "is not of type"),
    ],
)
def test_rayservice_validator_rejects_broken_manifests(mutate, expected):
    doc = copy.deepcopy(rayservice(spec(), "lab"))
    mutate(doc)
    assert any(expected in e for e in rayservice_errors(doc))


# -- the registry table every replica follows -------------------------------------------------------------


def test_adapter_table_versions_spec_folder_and_admin_entries(tmp_path):
    from loraforge.serve.engine import UnknownModelError
    from loraforge.serve.registry import AdapterTable
    from loraforge.serve.serve_config import AdapterSourceArg

    found = {"shop": tmp_path / "shop", "dir_only": tmp_path / "dir_only"}
    table = AdapterTable([AdapterSourceArg(name="shop", source="runs:/r1/adapter")], str(tmp_path),
                         pinned=["dir_only"], scan=lambda folder: dict(found))
    version, entries = table.snapshot()
    assert [(e.name, e.source, e.pin, e.origin) for e in entries] == [
        ("shop", "runs:/r1/adapter", False, "spec"), ("dir_only", str(tmp_path / "dir_only"), True, "dir")]
    assert table.rescan() == version  # nothing new: no change, no new version

    found["late"] = tmp_path / "late"
    assert table.rescan() == version + 1 and table.snapshot()[1][-1].name == "late"
    entry = table.put("shop", "/elsewhere", pin=True)  # replaced: a newer revision replicas will reload
    assert entry.revision == version + 2 and entry.origin == "admin"
    assert table.remove("late") == version + 3
    assert [e.name for e in table.snapshot()[1]] == ["dir_only", "shop"]  # in revision order
    with pytest.raises(UnknownModelError):
        table.remove("late")
