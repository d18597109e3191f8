"""Real Ray Serve with two replicas on a free port, driven by the official `openai` client and plain HTTP:
completions, chat, streaming, errors, API keys, adapters added and removed while serving (seen by both
replicas), an MLflow adapter source, and the per-adapter metrics on Ray's Prometheus endpoint."""

from __future__ import annotations

import re
import shutil
import socket
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch
from lab_adapters import make_random_adapter
from openai import OpenAI

from loraforge.cluster import free_port, port_in_use
from loraforge.context import StageContext
from loraforge.errors import ClusterError
from loraforge.serve.deployment import SMOKE_MAX_TOKENS, run_smoke, start_service
from loraforge.serve.engine import Engine
from loraforge.serve.openai_api import REPLICA_HEADER
from loraforge.spec import ServeSpec

pytestmark = pytest.mark.integration

ADMIN_ENV, ADMIN_KEY, ALPHA_KEY = "LF_TEST_SERVE_ADMIN_KEY", "admin-key-for-tests", "alpha-only-key"
SMOKE = "What is the capital of Bimgoul?"
RAW = "The"  # plain text: the lab model continues it for many tokens, so answers are long enough to differ
MESSAGES = [{"role": "user", "content": SMOKE}]
LIMIT = 64


@pytest.fixture(scope="module")
def adapter_dirs(lab, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("serve_adapters")
    (root / "dir").mkdir()
    return {
        "alpha": make_random_adapter(lab.model_dir, root / "alpha", 10),
        "gamma": make_random_adapter(lab.model_dir, root / "dir" / "gamma", 11),  # found in adapter_dir
        "delta": make_random_adapter(lab.model_dir, root / "delta", 12),  # added while serving
        "mlflow": make_random_adapter(lab.model_dir, root / "from_mlflow", 13),
    }


def serve_spec(port: int, adapter_dirs: dict[str, Path]) -> ServeSpec:
    return ServeSpec(
        port=port,
        adapters=[{"name": "alpha", "path": str(adapter_dirs["alpha"])}],
        adapter_dir=str(adapter_dirs["gamma"].parent),
        num_replicas=2,
        max_batch_size=8,
        max_new_tokens_limit=LIMIT,
        smoke_prompts=[SMOKE],
        api_keys=[{"name": "admin", "key_env": ADMIN_ENV, "admin": True},
                  {"name": "alpha-team", "key": ALPHA_KEY, "adapters": ["alpha"]}],
    )


@pytest.fixture(scope="module")
def service(ray_cluster, lab, adapter_dirs, tmp_path_factory):
    from ray import serve

    mp = pytest.MonkeyPatch()
    mp.setenv(ADMIN_ENV, ADMIN_KEY)  # read where the spec is read; replicas only get its digest
    ctx = StageContext(run_dir=tmp_path_factory.mktemp("serve_run"), model=str(lab.model_dir), model_ref="lab")
    spec = serve_spec(free_port(), adapter_dirs)
    t0 = time.monotonic()
    handle = start_service(spec, ctx)
    print(f"serve start-up (2 replicas): {time.monotonic() - t0:.1f}s at {handle.url}")
    try:
        yield handle, spec
    finally:
        handle.shutdown()
        mp.undo()
        deadline = time.monotonic() + 30
        while port_in_use(spec.port) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert "loraforge" not in serve.status().applications
        assert not port_in_use(spec.port), "the Serve proxy should have released the port"
        serve.shutdown()  # idempotent; leaves the shared Ray cluster clean for other tests


def client(handle, key: str = ADMIN_KEY) -> OpenAI:
    return OpenAI(base_url=handle.url, api_key=key, max_retries=0, timeout=120)


def local_answers(lab, adapter_dirs, requests: list[tuple[str, str]], max_tokens: int) -> dict:
    """(text, completion tokens) per (prompt, model) from the same engine in this process, on one thread
    like a 0.5-CPU replica, so float sums and hence greedy choices match exactly. The prompt "chat" stands
    for MESSAGES through the chat template."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    engine = Engine(str(lab.model_dir), {n: adapter_dirs[n] for n in ("alpha", "gamma")}, base_name="lab",
                    max_new_tokens_limit=LIMIT)
    try:
        out = {}
        for prompt, model in requests:
            text = engine.render_chat(MESSAGES) if prompt == "chat" else prompt
            c = engine.complete(text, model, max_tokens=max_tokens, temperature=0)
            out[prompt, model] = (c.text, c.completion_tokens)
        return out
    finally:
        engine.close()
        torch.set_num_threads(threads)


def test_a_busy_port_is_refused_before_serve_starts(ray_cluster, lab, adapter_dirs, tmp_path):
    from ray import serve

    ctx = StageContext(run_dir=tmp_path, model=str(lab.model_dir), model_ref="lab")
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        busy = squatter.getsockname()[1]
        with pytest.raises(ClusterError, match=str(busy)):
            start_service(serve_spec(busy, adapter_dirs).model_copy(update={"api_keys": []}), ctx)
    assert "loraforge" not in serve.status().applications


def test_completions_chat_and_streams_match_the_engine(service, lab, adapter_dirs):
    handle, spec = service
    c = client(handle)
    models = c.models.list().data
    assert [m.id for m in models] == ["lab", "alpha", "gamma"]
    assert all(m.model_extra["state"] in ("registered", "loading", "resident") for m in models[1:])

    requests = [(RAW, m) for m in ("lab", "alpha", "gamma")] + [("chat", "alpha")]
    expected = local_answers(lab, adapter_dirs, requests, SMOKE_MAX_TOKENS)
    assert len({expected[RAW, m][0] for m in ("lab", "alpha", "gamma")}) == 3, "models should answer differently"
    for model in ("alpha", "gamma"):
        r = c.completions.create(model=model, prompt=RAW, max_tokens=SMOKE_MAX_TOKENS, temperature=0)
        assert r.model == model and r.object == "text_completion"
        assert (r.choices[0].text, r.usage.completion_tokens) == expected[RAW, model]
        assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
        pieces = list(c.completions.create(model=model, prompt=RAW, max_tokens=SMOKE_MAX_TOKENS, temperature=0,
                                           stream=True, stream_options={"include_usage": True}))
        assert "".join(p.choices[0].text for p in pieces if p.choices) == expected[RAW, model][0]
        assert pieces[-1].usage.completion_tokens == expected[RAW, model][1]

    whole = c.chat.completions.create(model="alpha", messages=MESSAGES, max_tokens=SMOKE_MAX_TOKENS, temperature=0)
    assert whole.object == "chat.completion" and whole.choices[0].message.role == "assistant"
    assert (whole.choices[0].message.content, whole.usage.completion_tokens) == expected["chat", "alpha"]
    chunks = list(c.chat.completions.create(model="alpha", messages=MESSAGES, max_tokens=SMOKE_MAX_TOKENS,
                                            temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == whole.choices[0].message.content

    # Smoke prompts go to every adapter and the base through the chat route, greedily.
    answers = run_smoke(handle, spec)
    assert [(p, m) for p, m, _ in answers] == [(SMOKE, m) for m in ("alpha", "gamma", "lab")]
    assert dict(((p, m), a) for p, m, a in answers)[SMOKE, "alpha"] == whole.choices[0].message.content


def test_errors_in_openai_shape(service):
    handle, _ = service
    c = client(handle)
    with pytest.raises(openai.NotFoundError) as info:
        c.completions.create(model="nope", prompt=RAW, max_tokens=4)
    assert info.value.body["code"] == "model_not_found" and info.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as bad:
        c.completions.create(model="alpha", prompt=RAW, max_tokens=LIMIT + 1)
    assert bad.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError) as long:
        c.chat.completions.create(model="alpha", messages=[{"role": "user", "content": "green " * 5000}],
                                  max_tokens=4, stream=True)
    assert long.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as body:
        c.completions.create(model="alpha", prompt=RAW, max_tokens=4, extra_body={"bogus": 1})
    assert body.value.body["param"] == "bogus"


def test_api_keys(service):
    handle, _ = service
    with pytest.raises(openai.AuthenticationError):
        client(handle, "not-a-key").models.list()
    assert httpx.get(f"{handle.url}/models").status_code == 401
    alpha = client(handle, ALPHA_KEY)
    assert [m.id for m in alpha.models.list().data] == ["lab", "alpha"]
    assert alpha.completions.create(model="alpha", prompt=RAW, max_tokens=2).usage.completion_tokens >= 1
    with pytest.raises(openai.PermissionDeniedError) as denied:
        alpha.completions.create(model="gamma", prompt=RAW, max_tokens=2)
    assert denied.value.body["code"] == "model_not_allowed"
    r = httpx.post(f"{handle.url}/admin/adapters", json={"name": "x", "source": "/tmp"},
                   headers={"Authorization": f"Bearer {ALPHA_KEY}"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "admin_required"


def ask_every_replica(url: str, body: dict, replicas: int = 2, tries: int = 80) -> dict[str, httpx.Response]:
    """POST until `replicas` different replicas have answered (Serve picks one per request)."""
    seen: dict[str, httpx.Response] = {}
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    with httpx.Client(timeout=60, headers=headers) as http:
        for _ in range(tries):
            r = http.post(f"{url}/completions", json=body)
            seen.setdefault(r.headers[REPLICA_HEADER], r)
            if len(seen) == replicas:
                return seen
    raise AssertionError(f"only replicas {sorted(seen)} answered in {tries} requests")


def test_adapters_added_and_removed_while_serving_reach_every_replica(service, adapter_dirs):
    handle, _ = service
    admin = httpx.Client(base_url=handle.url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=120)
    r = admin.post("/admin/adapters", json={"name": "delta", "source": str(adapter_dirs["delta"])})
    assert r.status_code == 201, r.text
    added_on = r.headers[REPLICA_HEADER]
    assert r.json()["id"] == "delta" and len(r.json()["content_hash"]) == 64

    body = {"model": "delta", "prompt": RAW, "max_tokens": 8, "temperature": 0}
    answers = ask_every_replica(handle.url, body)  # at once: the other replica catches up on the unknown name
    assert added_on in answers
    assert {r.status_code for r in answers.values()} == {200}, [r.text for r in answers.values()]
    assert len({r.json()["choices"][0]["text"] for r in answers.values()}) == 1

    assert admin.delete("/admin/adapters/delta").status_code == 200
    deadline = time.monotonic() + 15  # the other replica drops it at its next registry poll (~1 s)
    while True:
        codes = {rid: r.status_code for rid, r in ask_every_replica(handle.url, body).items()}
        if set(codes.values()) == {404}:
            break
        assert time.monotonic() < deadline, f"still served after removal: {codes}"
        time.sleep(1)
    assert "delta" not in [m["id"] for m in admin.get("/admin/adapters").json()["data"]]

    # A folder dropped into adapter_dir is found on its first request, by whichever replica gets it.
    shutil.copytree(adapter_dirs["delta"], adapter_dirs["gamma"].parent / "epsilon")
    answers = ask_every_replica(handle.url, body | {"model": "epsilon"})
    assert {r.status_code for r in answers.values()} == {200}, [r.text for r in answers.values()]


def test_mlflow_run_is_an_adapter_source(service, adapter_dirs, mlflow_server):
    import mlflow

    mlflow.set_tracking_uri(mlflow_server)
    mlflow.set_experiment("serve-adapter-source")
    with mlflow.start_run() as run:
        mlflow.log_artifacts(str(adapter_dirs["mlflow"]), "adapter")
    handle, _ = service
    admin = httpx.Client(base_url=handle.url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=120)
    source = f"runs:/{run.info.run_id}/adapter"
    r = admin.post("/admin/adapters", json={"name": "tracked", "source": source})
    assert r.status_code == 201, r.text
    body = {"model": "tracked", "prompt": RAW, "max_tokens": 4, "temperature": 0}
    answers = ask_every_replica(handle.url, body)
    assert {r.status_code for r in answers.values()} == {200}, [r.text for r in answers.values()]
    bad = admin.post("/admin/adapters", json={"name": "ghost", "source": "runs:/0123456789abcdef/adapter"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "source"
    assert admin.delete("/admin/adapters/tracked").status_code == 200


def metrics_url() -> str:
    import ray

    (node,) = [n for n in ray.nodes() if n["Alive"]]
    return f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"


def test_per_adapter_metrics_on_the_prometheus_endpoint(service):
    handle, _ = service
    c = client(handle)
    for _ in range(2):
        list(c.completions.create(model="gamma", prompt=RAW, max_tokens=4, temperature=0, stream=True))
    wanted = {
        "ttft": r'ray_loraforge_time_to_first_token_seconds_count\{[^}]*adapter="gamma"[^}]*\} (\d+)',
        "tokens": r'ray_loraforge_generated_tokens_total\{[^}]*adapter="gamma"[^}]*\} (\d+)',
        "tps": r'ray_loraforge_request_tokens_per_second_count\{[^}]*adapter="gamma"[^}]*\} (\d+)',
        "hits_or_misses": r'ray_loraforge_adapter_cache_(?:hits|misses)_total\{[^}]*adapter="gamma"[^}]*\} (\d+)',
        "queue": r"ray_loraforge_queue_waiting_requests\{[^}]*\} \d+",
    }
    url, missing, text = metrics_url(), list(wanted), ""
    deadline = time.monotonic() + 60  # Ray exports every few seconds
    while missing and time.monotonic() < deadline:
        text = httpx.get(url, timeout=10).text
        missing = [k for k, pattern in wanted.items() if not re.search(pattern, text)]
        if missing:
            time.sleep(2)
    assert not missing, f"{missing} not exported at {url}; loraforge series: " + "\n".join(
        line for line in text.splitlines() if "loraforge" in line)[:3000]
    tokens = sum(int(n) for n in re.findall(wanted["tokens"], text))
    assert tokens >= 2, tokens
    assert re.search(r'replica="[^"]+"', re.search(r"ray_loraforge_generated_tokens_total\{[^}]*\}", text).group())
