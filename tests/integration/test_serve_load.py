"""Load: 32 concurrent streaming clients across 16 adapters on one replica (its continuous batch mixes
them), a bounded 64 requests. No errors; every stream is complete and equal to the same request served
alone (greedy)."""

from __future__ import annotations

import asyncio
import time

import pytest
from lab_adapters import make_adapter_zoo
from openai import AsyncOpenAI, OpenAI

from loraforge.cluster import free_port
from loraforge.context import StageContext
from loraforge.serve.deployment import start_service
from loraforge.spec import ServeSpec

pytestmark = pytest.mark.integration

ADAPTERS = 16
CLIENTS = 32
PROMPTS = ("The", "Which number is the largest?\n\n3 8 5", "What is 3 + 4? Think about the mayor of Bimgoul.")
MAX_TOKENS = 16
REQUESTS = [(f"a{i:02d}", PROMPTS[(i + k) % len(PROMPTS)]) for k in range(2) for i in range(ADAPTERS)]  # 32 pairs


@pytest.fixture(scope="module")
def service(ray_cluster, lab, tmp_path_factory):
    from ray import serve

    zoo = make_adapter_zoo(lab.model_dir, tmp_path_factory.mktemp("zoo"), ADAPTERS)
    spec = ServeSpec(port=free_port(), adapter_dir=str(next(iter(zoo.values())).parent), max_batch_size=CLIENTS,
                     max_new_tokens_limit=MAX_TOKENS, num_replicas=1, replica_cpus=1)
    ctx = StageContext(run_dir=tmp_path_factory.mktemp("load_run"), model=str(lab.model_dir), model_ref="lab")
    handle = start_service(spec, ctx)
    try:
        yield handle
    finally:
        handle.shutdown()
        serve.shutdown()


async def stream_one(client: AsyncOpenAI, model: str, prompt: str) -> tuple[str, str | None, int]:
    stream = await client.completions.create(model=model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
                                             stream=True, stream_options={"include_usage": True})
    text, finish, tokens = [], None, 0
    async for chunk in stream:
        if chunk.choices:
            text.append(chunk.choices[0].text)
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return "".join(text), finish, tokens


async def run_concurrently(url: str, requests: list[tuple[str, str]]) -> list[tuple[str, str | None, int]]:
    gate = asyncio.Semaphore(CLIENTS)
    async with AsyncOpenAI(base_url=url, api_key="none", max_retries=0, timeout=300) as client:
        async def one(model: str, prompt: str):
            async with gate:
                return await stream_one(client, model, prompt)

        return await asyncio.gather(*(one(m, p) for m, p in requests), return_exceptions=True)


def test_concurrent_streams_across_adapters_equal_requests_served_alone(service):
    assert sorted(m.id for m in OpenAI(base_url=service.url, api_key="none").models.list().data)[:ADAPTERS] == [
        f"a{i:02d}" for i in range(ADAPTERS)]
    t0 = time.monotonic()
    alone = {req: asyncio.run(run_concurrently(service.url, [req]))[0] for req in REQUESTS}
    t_alone = time.monotonic() - t0
    assert all(not isinstance(a, BaseException) for a in alone.values()), alone
    assert len({text for text, _, _ in alone.values()}) > ADAPTERS, "adapters should answer differently"

    load = REQUESTS * 2  # 64 requests, each pair twice, 32 in flight at a time
    t0 = time.monotonic()
    results = asyncio.run(run_concurrently(service.url, load))
    t_load = time.monotonic() - t0
    errors = [r for r in results if isinstance(r, BaseException)]
    assert not errors, errors[:3]
    for req, got in zip(load, results, strict=True):
        text, finish, tokens = got
        assert finish in ("stop", "length") and tokens >= 1, (req, got)
        assert got == alone[req], f"{req}: concurrent {got!r} != alone {alone[req]!r}"
    print(f"{len(REQUESTS)} requests alone: {t_alone:.1f}s; {len(load)} with {CLIENTS} concurrent: {t_load:.1f}s")
