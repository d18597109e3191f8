"""The OpenAI-compatible FastAPI app over a real engine (lab model + one adapter), without Ray."""

from __future__ import annotations

import pytest
import torch
from fastapi.testclient import TestClient

from loraforge.serve.engine import Engine
from loraforge.serve.openai_api import build_app

LIMIT = 32


@pytest.fixture(scope="module")
def engine(lab, tmp_path_factory) -> Engine:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(3)
    folder = tmp_path_factory.mktemp("adapter") / "tuned"
    cfg = LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(AutoModelForCausalLM.from_pretrained(lab.model_dir), cfg).save_pretrained(folder)
    return Engine(str(lab.model_dir), {"tuned": folder}, base_name="lab", max_new_tokens_limit=LIMIT)


@pytest.fixture(scope="module")
def client(engine) -> TestClient:
    return TestClient(build_app(engine), raise_server_exceptions=False)


def assert_openai_error(r, status: int, param: str | None = None, code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    assert err["type"] == "invalid_request_error"
    assert err["param"] == param and err["code"] == code
    return err


def test_models_lists_base_and_adapter(client):
    r = client.get("/v1/models")
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == ["lab", "tuned"]
    assert all(m["object"] == "model" and isinstance(m["created"], int) and m["owned_by"] for m in body["data"])
    assert client.get("/v1/models/tuned").json()["id"] == "tuned"


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


def test_unknown_model_is_404_model_not_found(client):
    r = client.post("/v1/completions", json={"model": "nope", "prompt": "The", "max_tokens": 4})
    err = assert_openai_error(r, 404, param="model", code="model_not_found")
    assert "nope" in err["message"]
    assert_openai_error(client.get("/v1/models/nope"), 404, param="model", code="model_not_found")


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": "The"}, "model"),  # missing field
        ({"model": "lab", "prompt": ["a", "b"]}, "prompt"),  # only one prompt per request
        ({"model": "lab", "prompt": [1, 2, 3]}, "prompt"),  # token ids are not accepted
        ({"model": "lab", "prompt": "The", "n": 2}, "n"),
        ({"model": "lab", "prompt": "The", "stream": True}, "stream"),
        ({"model": "lab", "prompt": "The", "temperature": 3}, "temperature"),
        ({"model": "lab", "prompt": "The", "max_tokens": "many"}, "max_tokens"),
        ({"model": "lab", "prompt": "The", "bogus": 1}, "bogus"),
    ],
)
def test_malformed_body_is_400_not_422(client, body, param):
    r = client.post("/v1/completions", json=body)
    err = assert_openai_error(r, 400, param=param)
    assert param in err["message"]


def test_invalid_json_is_400(client):
    r = client.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert "JSON" in assert_openai_error(r, 400)["message"]


def test_oversize_prompt_is_400_context_length_exceeded(client, engine):
    prompt = "The mayor is green. " * engine.context_length
    r = client.post("/v1/completions", json={"model": "tuned", "prompt": prompt, "max_tokens": 4})
    err = assert_openai_error(r, 400, param="prompt", code="context_length_exceeded")
    assert str(engine.context_length) in err["message"]


@pytest.mark.parametrize("max_tokens", [0, LIMIT + 1])
def test_max_tokens_out_of_range_is_400(client, max_tokens):
    r = client.post("/v1/completions", json={"model": "lab", "prompt": "The", "max_tokens": max_tokens})
    err = assert_openai_error(r, 400, param="max_tokens", code="invalid_value")
    assert str(LIMIT) in err["message"]


def test_unknown_route_is_404_in_openai_shape(client):
    assert_openai_error(client.get("/v1/chat/nothing"), 404)
