"""Real Ray Serve on a free port, two adapters, driven by the official `openai` client."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import openai
import pytest
import torch
from lab_adapters import make_random_adapter
from openai import OpenAI

from loraforge.cluster import free_port, port_in_use
from loraforge.context import StageContext
from loraforge.errors import ClusterError
from loraforge.serve.deployment import SMOKE_MAX_TOKENS, render_chat_prompt, run_smoke, start_service
from loraforge.serve.engine import Engine
from loraforge.spec import ServeSpec

pytestmark = pytest.mark.integration

ADAPTERS = ("alpha", "beta")
SMOKE = "What is the capital of Bimgoul?"
RAW = "The"  # plain text: the lab model continues it for many tokens, so answers are long enough to differ


@pytest.fixture(scope="module")
def adapter_dirs(lab, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("serve_adapters")
    return {name: make_random_adapter(lab.model_dir, root / name, 10 + i) for i, name in enumerate(ADAPTERS)}


def serve_spec(port: int, adapter_dirs: dict[str, Path]) -> ServeSpec:
    return ServeSpec(
        port=port,
        adapters=[{"name": n, "path": str(p)} for n, p in adapter_dirs.items()],
        max_new_tokens_limit=64,
        smoke_prompts=[SMOKE],
    )


def local_answers(lab, adapter_dirs, prompts: list[str], max_tokens: int) -> dict[tuple[str, str], tuple[str, int]]:
    """(text, completion tokens) per (prompt, model) from the same engine in this process, on one thread
    like a 0.5-CPU replica, so float sums and hence greedy choices match exactly."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        engine = Engine(str(lab.model_dir), adapter_dirs, base_name="lab", max_new_tokens_limit=64)
        out = {}
        for prompt in prompts:
            for m in engine.models():
                c = engine.complete(prompt, m, max_tokens=max_tokens, temperature=0)
                out[prompt, m] = (c.text, c.completion_tokens)
        return out
    finally:
        torch.set_num_threads(threads)


def serve_app_names() -> set[str]:
    from ray import serve

    return set(serve.status().applications)


def test_serve_over_http_with_the_openai_client(ray_cluster, lab, adapter_dirs, tmp_path):
    from ray import serve

    ctx = StageContext(run_dir=tmp_path, model=str(lab.model_dir), model_ref="lab")

    # A port held by another program is refused before Serve starts.
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        busy = squatter.getsockname()[1]
        with pytest.raises(ClusterError, match=str(busy)):
            start_service(serve_spec(busy, adapter_dirs), ctx)
    assert "loraforge" not in serve_app_names()

    spec = serve_spec(free_port(), adapter_dirs)
    t0 = time.monotonic()
    handle = start_service(spec, ctx)
    try:
        print(f"serve start-up: {time.monotonic() - t0:.1f}s at {handle.url}")
        assert handle.url == f"http://127.0.0.1:{spec.port}/v1"
        client = OpenAI(base_url=handle.url, api_key="x", max_retries=0, timeout=120)

        assert [m.id for m in client.models.list()] == ["lab", *ADAPTERS]

        chat = render_chat_prompt(client_tokenizer(lab), SMOKE)
        expected = local_answers(lab, adapter_dirs, [RAW, chat], SMOKE_MAX_TOKENS)
        raw_texts = {expected[RAW, m][0] for m in ["lab", *ADAPTERS]}
        assert len(raw_texts) == 3, f"base and both adapters should continue differently: {raw_texts}"
        for model in ADAPTERS:
            for prompt in (RAW, chat):
                r = client.completions.create(model=model, prompt=prompt, max_tokens=SMOKE_MAX_TOKENS, temperature=0)
                assert r.model == model and r.object == "text_completion"
                assert (r.choices[0].text, r.usage.completion_tokens) == expected[prompt, model]
                assert r.choices[0].finish_reason in ("stop", "length")
                assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens

        with pytest.raises(openai.NotFoundError) as info:
            client.completions.create(model="gamma", prompt=RAW, max_tokens=4)
        assert info.value.status_code == 404
        assert info.value.body["code"] == "model_not_found" and info.value.body["param"] == "model"
        assert info.value.body["type"] == "invalid_request_error" and "gamma" in info.value.body["message"]

        with pytest.raises(openai.BadRequestError) as bad:
            client.completions.create(model="alpha", prompt=RAW, max_tokens=65)
        assert bad.value.body["param"] == "max_tokens"

        # Smoke prompts go to every adapter and the base, chat-templated, greedily.
        answers = run_smoke(handle, spec)
        assert answers == [(SMOKE, m, expected[chat, m][0]) for m in [*ADAPTERS, "lab"]]
    finally:
        handle.shutdown()
    assert "loraforge" not in serve_app_names()
    deadline = time.monotonic() + 30
    while port_in_use(spec.port) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not port_in_use(spec.port), "the Serve proxy should have released the port"
    serve.shutdown()  # idempotent; leaves the shared Ray cluster clean for other tests


def client_tokenizer(lab):
    from loraforge.resolve import load_tokenizer

    return load_tokenizer(str(lab.model_dir))
