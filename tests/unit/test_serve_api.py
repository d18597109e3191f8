"""The OpenAI-compatible FastAPI app over a real engine (lab model + adapters), without Ray.

The official `openai` client talks to the app through FastAPI's TestClient (an httpx client), so its
own parser checks the response and stream chunk formats; raw SSE lines are checked too."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import openai
import pytest
import torch
from fastapi.testclient import TestClient
from lab_adapters import make_random_adapter
from openai import OpenAI
from safetensors.torch import load_file, save_file

from loraforge.serve.auth import ApiKeyArg, KeyRing, key_digest
from loraforge.serve.engine import ADAPTER_WEIGHTS, Engine, check_adapter_dir
from loraforge.serve.openai_api import REPLICA_HEADER, LocalAdapterAdmin, build_app

LIMIT = 32
ADMIN_KEY, SHOP_KEY = "admin-key-0123", "shop-key-4567"


@pytest.fixture(scope="module")
def adapter_dirs(lab, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {name: make_random_adapter(lab.model_dir, root / name, seed=3 + i, targets=("q_proj", "v_proj"))
            for i, name in enumerate(("tuned", "spare"))}


@pytest.fixture(scope="module")
def engine(lab, adapter_dirs, one_torch_thread) -> Engine:
    e = Engine(str(lab.model_dir), {"tuned": adapter_dirs["tuned"]}, base_name="lab", max_new_tokens_limit=LIMIT,
               max_batch_size=4)
    yield e
    e.close()


@pytest.fixture(scope="module")
def client(engine) -> TestClient:
    app = build_app(engine, admin=LocalAdapterAdmin(engine, check_adapter_dir), replica_id="r1")
    return TestClient(app, raise_server_exceptions=False)


@pytest.fixture(scope="module")
def oai(client) -> OpenAI:
    return OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=client, max_retries=0)


def assert_openai_error(r, status: int, param: str | None = None, code: str | None = None,
                        type_: str = "invalid_request_error") -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    assert err["type"] == type_
    assert err["param"] == param and err["code"] == code
    return err


def sse_events(r) -> list:
    """The `data:` payloads of an SSE response, JSON-decoded except the final [DONE]."""
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/event-stream")
    events = [line.removeprefix("data: ") for line in r.text.split("\n\n") if line]
    assert events[-1] == "[DONE]", events[-3:]
    return [json.loads(e) for e in events[:-1]] + ["[DONE]"]


# -- models -----------------------------------------------------------------------------------------------


def test_models_lists_base_and_adapters_with_state(client, engine):
    r = client.get("/v1/models")
    assert r.status_code == 200 and r.headers[REPLICA_HEADER] == "r1"
    body = r.json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]][:2] == ["lab", "tuned"]
    base, tuned = body["data"][:2]
    assert all(m["object"] == "model" and isinstance(m["created"], int) and m["owned_by"] for m in body["data"])
    assert (base["kind"], base["state"], base["content_hash"]) == ("base", "resident", None)
    info = {i.name: i for i in engine.model_info()}["tuned"]
    assert tuned["kind"] == "adapter" and tuned["state"] in ("registered", "loading", "resident")
    assert tuned["content_hash"] == info.content_hash and len(tuned["content_hash"]) == 64 and tuned["rank"] == 4
    assert client.get("/v1/models/tuned").json()["id"] == "tuned"
    assert client.get("/v1/models/base").json()["id"] == "lab"


# -- completions ------------------------------------------------------------------------------------------


def test_completion_has_openai_shape_and_engine_output(client, engine):
    expected = engine.complete("The", "tuned", max_tokens=8, temperature=0)
    r = client.post("/v1/completions", json={"model": "tuned", "prompt": "The", "max_tokens": 8, "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"].startswith("cmpl-") and body["object"] == "text_completion"
    assert isinstance(body["created"], int) and body["model"] == "tuned"
    assert body["choices"] == [
        {"text": expected.text, "index": 0, "finish_reason": expected.finish_reason, "logprobs": None}
    ]
    assert body["usage"] == {
        "prompt_tokens": expected.prompt_tokens,
        "completion_tokens": expected.completion_tokens,
        "total_tokens": expected.prompt_tokens + expected.completion_tokens,
    }


def test_prompt_as_one_element_list_and_stop_as_string(client, engine):
    full = engine.complete("The", "lab", max_tokens=16, temperature=0).text
    stop = full[4:6]
    r = client.post("/v1/completions", json={
        "model": "lab", "prompt": ["The"], "max_tokens": 16, "temperature": 0, "stop": stop, "n": 1, "seed": 1,
    })
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["text"] == full[: full.find(stop)] and choice["finish_reason"] == "stop"


def test_completion_stream_chunks(client, engine):
    expected = engine.complete("The", "tuned", max_tokens=12, temperature=0)
    r = client.post("/v1/completions", json={"model": "tuned", "prompt": "The", "max_tokens": 12, "temperature": 0,
                                             "stream": True, "stream_options": {"include_usage": True}})
    events = sse_events(r)
    chunks, usage = events[:-2], events[-2]
    assert len(chunks) >= 2, "a 12-token completion should arrive in several chunks"
    assert {c["object"] for c in chunks} == {"text_completion"} and len({c["id"] for c in chunks}) == 1
    assert all(c["usage"] is None for c in chunks)
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * (len(chunks) - 1) + [expected.finish_reason]
    assert "".join(c["choices"][0]["text"] for c in chunks) == expected.text
    assert usage["choices"] == [] and usage["usage"] == {
        "prompt_tokens": expected.prompt_tokens, "completion_tokens": expected.completion_tokens,
        "total_tokens": expected.prompt_tokens + expected.completion_tokens}


def test_openai_client_streams_completions(oai, engine):
    expected = engine.complete("The", "lab", max_tokens=10, temperature=0)
    pieces = list(oai.completions.create(model="lab", prompt="The", max_tokens=10, temperature=0, stream=True))
    assert "".join(p.choices[0].text for p in pieces) == expected.text
    assert pieces[-1].choices[0].finish_reason == expected.finish_reason


# -- chat ---------------------------------------------------------------------------------------------------

MESSAGES = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is 3 + 4?"}]


def test_chat_uses_the_chat_template(oai, engine):
    expected = engine.complete(engine.render_chat(MESSAGES), "tuned", max_tokens=12, temperature=0)
    r = oai.chat.completions.create(model="tuned", messages=MESSAGES, max_tokens=12, temperature=0)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == "tuned"
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == expected.text
    assert r.choices[0].finish_reason == expected.finish_reason
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (expected.prompt_tokens, expected.completion_tokens)
    # Content parts and max_completion_tokens (newer clients) mean the same.
    parts = [{"role": "user", "content": [{"type": "text", "text": "What is "}, {"type": "text", "text": "3 + 4?"}]}]
    again = oai.chat.completions.create(model="tuned", messages=[MESSAGES[0], *parts], max_completion_tokens=12,
                                        temperature=0)
    assert again.choices[0].message.content == expected.text


def test_chat_stream_sends_role_then_content_then_finish(client, oai, engine):
    expected = engine.complete(engine.render_chat(MESSAGES), "lab", max_tokens=12, temperature=0)
    r = client.post("/v1/chat/completions", json={"model": "lab", "messages": MESSAGES, "max_tokens": 12,
                                                  "temperature": 0, "stream": True})
    chunks = sse_events(r)[:-1]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"} and "usage" not in chunks[0]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"][0] == {"index": 0, "delta": {}, "finish_reason": expected.finish_reason,
                                        "logprobs": None}
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == expected.text

    stream = oai.chat.completions.create(model="lab", messages=MESSAGES, max_tokens=12, temperature=0, stream=True,
                                         stream_options={"include_usage": True})
    pieces = list(stream)
    assert "".join(p.choices[0].delta.content or "" for p in pieces if p.choices) == expected.text
    assert pieces[-1].choices == [] and pieces[-1].usage.completion_tokens == expected.completion_tokens


# -- errors ---------------------------------------------------------------------------------------------------


def test_unknown_model_is_404_model_not_found(client):
    for route, body in (("/v1/completions", {"prompt": "The"}), ("/v1/chat/completions", {"messages": MESSAGES})):
        r = client.post(route, json={"model": "nope", "max_tokens": 4, **body})
        err = assert_openai_error(r, 404, param="model", code="model_not_found")
        assert "nope" in err["message"]
    assert_openai_error(client.get("/v1/models/nope"), 404, param="model", code="model_not_found")


@pytest.mark.parametrize(
    ("route", "body", "param"),
    [
        ("completions", {"prompt": "The"}, "model"),  # missing field
        ("completions", {"model": "lab", "prompt": ["a", "b"]}, "prompt"),  # only one prompt per request
        ("completions", {"model": "lab", "prompt": [1, 2, 3]}, "prompt"),  # token ids are not accepted
        ("completions", {"model": "lab", "prompt": "The", "n": 2}, "n"),
        ("completions", {"model": "lab", "prompt": "The", "echo": True}, "echo"),
        ("completions", {"model": "lab", "prompt": "The", "temperature": 3}, "temperature"),
        ("completions", {"model": "lab", "prompt": "The", "max_tokens": "many"}, "max_tokens"),
        ("completions", {"model": "lab", "prompt": "The", "bogus": 1}, "bogus"),
        ("completions", {"model": "lab", "prompt": "The", "stream_options": {"include_usage": True}},
         "stream_options"),
        ("chat/completions", {"model": "lab", "messages": []}, "messages"),
        ("chat/completions", {"model": "lab", "messages": [{"role": "tool", "content": "x"}]}, "messages"),
        ("chat/completions", {"model": "lab", "messages": MESSAGES, "tools": []}, "tools"),
        ("chat/completions", {"model": "lab", "messages": MESSAGES, "max_tokens": 4, "max_completion_tokens": 4},
         "max_completion_tokens"),
    ],
)
def test_malformed_body_is_400_not_422(client, route, body, param):
    r = client.post(f"/v1/{route}", json=body)
    err = assert_openai_error(r, 400, param=param)
    assert param in err["message"]


def test_invalid_json_is_400(client):
    r = client.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert "JSON" in assert_openai_error(r, 400)["message"]


def test_oversize_prompt_is_400_context_length_exceeded(client, engine):
    prompt = "The mayor is green. " * engine.context_length
    for stream in (False, True):  # refused before a stream starts
        r = client.post("/v1/completions", json={"model": "tuned", "prompt": prompt, "max_tokens": 4,
                                                 "stream": stream})
        err = assert_openai_error(r, 400, param="prompt", code="context_length_exceeded")
        assert str(engine.context_length) in err["message"]


@pytest.mark.parametrize("max_tokens", [0, LIMIT + 1])
def test_max_tokens_out_of_range_is_400(client, max_tokens):
    r = client.post("/v1/completions", json={"model": "lab", "prompt": "The", "max_tokens": max_tokens})
    err = assert_openai_error(r, 400, param="max_tokens", code="invalid_value")
    assert str(LIMIT) in err["message"]
    r = client.post("/v1/chat/completions", json={"model": "lab", "messages": MESSAGES, "max_tokens": max_tokens})
    assert_openai_error(r, 400, param="max_tokens", code="invalid_value")


def test_unknown_route_is_404_in_openai_shape(client):
    assert_openai_error(client.get("/v1/chat/nothing"), 404)


def test_error_after_the_stream_started_is_an_sse_error_event(client, oai, adapter_dirs, tmp_path):
    """An adapter whose weights do not fit the model registers (its files are fine) but fails to load once a
    request needs it: the stream has started, so the error arrives as an event and the client raises it."""
    broken = tmp_path / "broken"
    shutil.copytree(adapter_dirs["spare"], broken)
    tensors = load_file(broken / ADAPTER_WEIGHTS)
    key = next(k for k in tensors if "lora_A" in k)
    tensors[key] = torch.zeros(tensors[key].shape[0], tensors[key].shape[1] + 3)
    save_file(tensors, broken / ADAPTER_WEIGHTS)
    assert client.post("/v1/admin/adapters", json={"name": "broken", "source": str(broken)}).status_code == 201
    try:
        r = client.post("/v1/completions", json={"model": "broken", "prompt": "The", "max_tokens": 4, "stream": True})
        events = sse_events(r)
        assert set(events[-2]) == {"error"} and events[-2]["error"]["type"] == "server_error"
        assert "broken" in events[-2]["error"]["message"]
        with pytest.raises(openai.APIError, match="broken"):
            list(oai.completions.create(model="broken", prompt="The", max_tokens=4, stream=True))
        states = {m["id"]: m["state"] for m in client.get("/v1/models").json()["data"]}
        assert states["broken"] == "failed"
    finally:
        client.delete("/v1/admin/adapters/broken")


# -- adapter administration ---------------------------------------------------------------------------------


def test_admin_adds_serves_and_removes_an_adapter(client, engine, adapter_dirs):
    r = client.post("/v1/admin/adapters", json={"name": "fresh", "source": str(adapter_dirs["spare"]), "pin": True})
    assert r.status_code == 201, r.text
    card = r.json()
    assert card["id"] == "fresh" and card["state"] == "resident" and card["pinned"] is True
    assert card["content_hash"] == {i.name: i for i in engine.model_info()}["fresh"].content_hash
    assert "fresh" in [a["id"] for a in client.get("/v1/admin/adapters").json()["data"]]
    listed = client.get("/v1/admin/adapters").json()["data"]
    assert all(a["kind"] == "adapter" for a in listed)

    body = {"model": "fresh", "prompt": "The", "max_tokens": 8, "temperature": 0}
    served = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
    assert served != client.post("/v1/completions", json=body | {"model": "lab"}).json()["choices"][0]["text"]

    assert client.delete("/v1/admin/adapters/fresh").json() == {"id": "fresh", "object": "model", "deleted": True}
    assert_openai_error(client.post("/v1/completions", json=body), 404, param="model", code="model_not_found")
    assert_openai_error(client.delete("/v1/admin/adapters/fresh"), 404, param="model", code="model_not_found")


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        ({"name": "x", "source": "/no/such/folder"}, "source", "invalid_adapter"),
        ({"name": "lab", "source": "/tmp"}, "name", "invalid_adapter"),  # the base model's name
        ({"name": "bad name", "source": "/tmp"}, "name", None),
        ({"name": "x"}, "source", None),
    ],
)
def test_admin_refuses_bad_adapters(client, body, param, code):
    assert_openai_error(client.post("/v1/admin/adapters", json=body), 400, param=param, code=code)


# -- API keys -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def secured(engine) -> TestClient:
    keys = KeyRing.from_args([ApiKeyArg(name="admin", key_env="LF_TEST_ADMIN", admin=True),
                              ApiKeyArg(name="shop", key_sha256=key_digest(SHOP_KEY), adapters=["tuned"])],
                             environ={"LF_TEST_ADMIN": ADMIN_KEY})
    return TestClient(build_app(engine, keys=keys, admin=LocalAdapterAdmin(engine, check_adapter_dir)),
                      raise_server_exceptions=False)


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_every_route_needs_a_valid_key(secured):
    body = {"model": "lab", "prompt": "The", "max_tokens": 2}
    for headers in ({}, bearer("wrong-key"), {"Authorization": ADMIN_KEY}):
        assert_openai_error(secured.post("/v1/completions", json=body, headers=headers), 401, code="invalid_api_key")
        assert_openai_error(secured.get("/v1/models", headers=headers), 401, code="invalid_api_key")
        assert_openai_error(secured.get("/health", headers=headers), 401, code="invalid_api_key")
    # Even a malformed body is refused for the missing key first.
    assert_openai_error(secured.post("/v1/completions", json={"bogus": 1}), 401, code="invalid_api_key")
    assert secured.get("/openapi.json", headers=bearer(ADMIN_KEY)).status_code == 404  # no open docs
    assert secured.post("/v1/completions", json=body, headers=bearer(ADMIN_KEY)).status_code == 200


def test_allow_lists_restrict_adapters(secured, engine, adapter_dirs):
    engine.add_adapter("other", adapter_dirs["spare"])
    try:
        shop = bearer(SHOP_KEY)
        assert [m["id"] for m in secured.get("/v1/models", headers=shop).json()["data"]] == ["lab", "tuned"]
        assert "other" in [m["id"] for m in secured.get("/v1/models", headers=bearer(ADMIN_KEY)).json()["data"]]
        ok = {"model": "tuned", "prompt": "The", "max_tokens": 2}
        assert secured.post("/v1/completions", json=ok, headers=shop).status_code == 200
        assert secured.post("/v1/completions", json=ok | {"model": "lab"}, headers=shop).status_code == 200
        for route, body in (("completions", ok | {"model": "other"}),
                            ("chat/completions", {"model": "other", "messages": MESSAGES, "max_tokens": 2})):
            err = assert_openai_error(secured.post(f"/v1/{route}", json=body, headers=shop), 403, param="model",
                                      code="model_not_allowed")
            assert "other" in err["message"]
        assert_openai_error(secured.get("/v1/models/other", headers=shop), 403, param="model",
                            code="model_not_allowed")
    finally:
        engine.remove_adapter("other")


def test_admin_routes_need_an_admin_key(secured, adapter_dirs):
    add = {"name": "viakey", "source": str(adapter_dirs["spare"])}
    for headers in ({}, bearer(SHOP_KEY)):
        r = secured.post("/v1/admin/adapters", json=add, headers=headers)
        assert r.status_code in (401, 403) and "error" in r.json()
    assert_openai_error(secured.get("/v1/admin/adapters", headers=bearer(SHOP_KEY)), 403, code="admin_required")
    assert secured.post("/v1/admin/adapters", json=add, headers=bearer(ADMIN_KEY)).status_code == 201
    assert secured.delete("/v1/admin/adapters/viakey", headers=bearer(ADMIN_KEY)).status_code == 200
