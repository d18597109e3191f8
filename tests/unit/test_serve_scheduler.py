"""The batching engine's parts: nucleus sampling against transformers' warpers, incremental detokenization,
the request stream (sync, asyncio, cancel) and the scheduler loop's treatment of adapters that are loading."""

from __future__ import annotations

import asyncio
import json
import shutil
import threading
import time
from pathlib import Path

import pytest
import torch
from lab_adapters import make_random_adapter
from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

from loraforge.errors import ModelError
from loraforge.serve.engine.adapter_cache import AdapterCache
from loraforge.serve.engine.adapter_weights import read_adapter
from loraforge.serve.engine.detok import IncrementalDetokenizer
from loraforge.serve.engine.runner import ModelRunner
from loraforge.serve.engine.sampling import (
    Sampler,
    SamplingParams,
    choose_tokens,
    nucleus_distribution,
    nucleus_pick,
)
from loraforge.serve.engine.scheduler import (
    Delta,
    EngineClosedError,
    RequestCancelledError,
    RequestStream,
    Scheduler,
    new_request,
)


# ------------------------------------------------------------------ sampling
@pytest.mark.parametrize(("temperature", "top_p"), [(1.0, 1.0), (0.7, 0.9), (1.5, 0.5), (0.3, 0.05)])
def test_nucleus_pick_draws_from_the_same_distribution_as_transformers_warpers(temperature, top_p):
    torch.manual_seed(0)
    logits = torch.randn(40) * 3
    warped = TopPLogitsWarper(top_p)(None, TemperatureLogitsWarper(temperature)(None, logits[None].clone()))
    reference = torch.softmax(warped[0], dim=-1)

    ours = nucleus_distribution(logits, temperature, top_p)
    assert torch.equal(ours > 0, reference > 0), "same nucleus as transformers' TopPLogitsWarper"
    assert torch.allclose(ours, reference, atol=1e-6)

    # nucleus_pick is its inverse CDF: a fine grid of u gives each token a share equal to its probability.
    grid = 4_000
    counts = torch.zeros(40)
    for k in range(grid):
        counts[nucleus_pick(logits, temperature, top_p, (k + 0.5) / grid)] += 1
    assert torch.equal(counts > 0, (ours * grid).round() > 0) or torch.all((counts > 0) <= (ours > 0))
    assert torch.allclose(counts / grid, ours, atol=2 / grid)


def test_nucleus_pick_stays_in_the_nucleus_at_the_top_of_the_unit_interval():
    logits = torch.tensor([5.0, 4.0, -30.0, -30.0])
    for u in (0.0, 0.999999, 1.0 - 2**-24):
        assert int(nucleus_pick(logits, 1.0, 0.5, u)) == 0
        assert int(nucleus_pick(logits, 1.0, 0.95, u)) in (0, 1)


def test_greedy_rows_take_the_argmax_and_seeded_rows_repeat_whatever_the_batch():
    torch.manual_seed(1)
    logits = torch.randn(4, 100)
    greedy = Sampler(SamplingParams(temperature=0))
    assert choose_tokens([greedy], logits[2:3]) == [int(logits[2].argmax())]

    def run(rows: list[int], seeded_row: int) -> list[int]:
        samplers = [Sampler(SamplingParams(temperature=0 if i % 2 else 1.0, seed=None)) for i in rows]
        samplers[seeded_row] = Sampler(SamplingParams(temperature=0.8, top_p=0.9, seed=42))
        picks = []
        for _ in range(30):
            picks.append(choose_tokens(samplers, logits[rows])[seeded_row])
        return picks

    alone = run([3], 0)
    busy = run([0, 1, 3, 2], 2)
    assert alone == busy
    assert len(set(alone)) > 1, "temperature 0.8 over random logits samples more than one token"


# ------------------------------------------------------------------ detokenization
@pytest.fixture(scope="module")
def tokenizer(lab):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(lab.model_dir)


def stream_text(tokenizer, ids: list[int], stop: tuple[str, ...] = ()) -> tuple[list[str], IncrementalDetokenizer]:
    detok = IncrementalDetokenizer(tokenizer, stop)
    pieces = []
    for i in ids:
        detok.add(i)
        pieces.append(detok.take())
    pieces.append(detok.finish())
    return pieces, detok


def test_detok_pieces_join_to_the_full_decode_and_never_split_a_character(tokenizer):
    text = "héllo wörld ✓ 日本語 The mayor is green."
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(text.split()), "byte-level BPE splits the non-ASCII characters into byte tokens"
    pieces, _ = stream_text(tokenizer, ids)
    assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True) == text
    assert not any("\ufffd" in p for p in pieces)
    assert "日" in pieces and "" in pieces, "a 3-byte character arrives whole, after tokens that add nothing"


def test_detok_cuts_before_the_earliest_stop_string_spanning_tokens(tokenizer):
    text = "The mayor is green. The baker is blue."
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    stop = ("baker", "or is g")  # "or is g" spans several tokens and comes first
    pieces, detok = stream_text(tokenizer, ids, stop)
    assert "".join(pieces) == detok.text == "The may"
    assert detok.stopped


def test_detok_holds_back_a_possible_stop_start_and_releases_it_when_it_is_not_one(tokenizer):
    detok = IncrementalDetokenizer(tokenizer, ("green!",))
    shown = ""
    for i in tokenizer("The mayor is green. Yes", add_special_tokens=False)["input_ids"]:
        detok.add(i)
        shown += detok.take()
        assert not shown.endswith("gr") and not shown.endswith("green"), "a possible stop start is held back"
    assert shown + detok.finish() == "The mayor is green. Yes"
    assert not detok.stopped


def test_detok_skips_special_tokens(tokenizer):
    ids = tokenizer("A<|end|>B", add_special_tokens=False)["input_ids"]
    pieces, _ = stream_text(tokenizer, ids)
    assert "".join(pieces) == "AB"


# ------------------------------------------------------------------ the request stream
def deltas(texts: list[str]) -> list[Delta]:
    n = len(texts)
    return [Delta(t, (i,), "length" if i == n - 1 else None, 3, i + 1) for i, t in enumerate(texts)]


def feed_later(stream: RequestStream, items: list[Delta], pause: float = 0.01) -> threading.Thread:
    def run() -> None:
        for d in items:
            time.sleep(pause)
            stream.push(d)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_stream_iterates_blocking_and_result_joins_the_text():
    cancelled = []
    stream = RequestStream("r1", "m", 3, lambda: cancelled.append(True))
    thread = feed_later(stream, deltas(["a", "b", "", "c"]))
    assert [d.text for d in stream] == ["a", "b", "", "c"]
    thread.join()
    result = stream.result()
    assert (result.text, result.completion_tokens, result.finish_reason) == ("abc", 4, "length")
    assert result.prompt_tokens == 3
    assert not cancelled


def test_stream_iterates_from_asyncio_and_cancels_when_the_consumer_leaves():
    stream = RequestStream("r2", "m", 3, lambda: None)
    thread = feed_later(stream, deltas(["x", "y", "z"]))

    async def read_all() -> list[str]:
        return [d.text async for d in stream]

    assert asyncio.run(read_all()) == ["x", "y", "z"]
    thread.join()

    cancelled = []
    stream = RequestStream("r3", "m", 3, lambda: cancelled.append(True))
    thread = feed_later(stream, deltas(["x", "y", "z", "w"]), pause=0.05)

    async def read_one() -> str:
        async for d in stream:
            return d.text  # leaving early, like a disconnected HTTP client
        return ""

    assert asyncio.run(read_one()) == "x"
    assert cancelled == [True] and stream.cancelled
    thread.join()
    with pytest.raises(RequestCancelledError):
        stream.result()


def test_stream_raises_the_engine_error_to_its_reader():
    stream = RequestStream("r4", "m", 3, lambda: None)
    stream.push(Delta("a", (1,), None, 3, 1))
    stream.fail(ValueError("adapter failed to load"))
    it = iter(stream)
    assert next(it).text == "a"
    with pytest.raises(ValueError, match="failed to load"):
        next(it)
    with pytest.raises(ValueError, match="failed to load"):
        stream.result()


# ------------------------------------------------------------------ the loop with adapters that are loading
@pytest.fixture(scope="module")
def base_model(lab, one_torch_thread):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(lab.model_dir).eval()


@pytest.fixture(scope="module")
def two_adapters(lab, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sched_adapters")
    return {name: make_random_adapter(lab.model_dir, root / name, seed) for seed, name in [(5, "slow"), (6, "fast")]}


class GatedReads:
    """A real adapter read that, for the names in `gated`, first waits for `gate` (a slow disk)."""

    def __init__(self, base, gated: set[str]):
        self.base, self.gated, self.gate = base, gated, threading.Event()

    def __call__(self, name: str, folder: Path):
        if name in self.gated:
            assert self.gate.wait(60)
        return read_adapter(name, folder, self.base)


def run_loop(base_model, cache, max_batch_size: int = 4) -> Scheduler:
    runner = ModelRunner(base_model, max_slots=max_batch_size, max_len=64)
    return Scheduler(runner, cache, cache.get, [2], max_batch_size=max_batch_size)


def submit(scheduler: Scheduler, tokenizer, adapter: str | None, max_tokens: int = 12) -> RequestStream:
    ids = tokenizer("The mayor", add_special_tokens=False)["input_ids"]
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    request = new_request(adapter or "base", adapter, ids, params, tokenizer, scheduler.wake)
    scheduler.enqueue(request)
    return request.stream


def test_a_request_whose_adapter_is_loading_does_not_stall_the_others(base_model, tokenizer, two_adapters):
    reads = GatedReads(base_model, {"slow"})
    cache = AdapterCache(reads)
    cache.register("fast", two_adapters["fast"], pin=True)
    cache.register("slow", two_adapters["slow"])
    scheduler = run_loop(base_model, cache)
    try:
        slow = submit(scheduler, tokenizer, "slow")
        others = [submit(scheduler, tokenizer, "fast"), submit(scheduler, tokenizer, None)]
        done = [s.result() for s in others]  # would hang if the slow load held the loop
        assert [r.completion_tokens for r in done] == [12, 12]
        assert {e.name: e.state for e in cache.entries()}["slow"] == "loading"

        # While only the waiting request is left the loop sleeps instead of spinning.
        before = scheduler.iterations
        time.sleep(0.3)
        assert scheduler.iterations - before <= 2

        reads.gate.set()
        text = slow.result().text
        again = submit(scheduler, tokenizer, "slow").result().text
        assert text == again and text != done[0].text != done[1].text
    finally:
        reads.gate.set()
        scheduler.close()
        cache.close()


def test_an_adapter_that_fails_to_load_fails_its_requests_only(base_model, tokenizer, two_adapters, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(two_adapters["slow"], broken)
    config = json.loads((broken / "adapter_config.json").read_text())
    (broken / "adapter_config.json").write_text(json.dumps(config | {"lora_bias": True}))
    cache = AdapterCache(GatedReads(base_model, set()))
    cache.register("broken", broken)
    scheduler = run_loop(base_model, cache, max_batch_size=1)
    try:
        bad = submit(scheduler, tokenizer, "broken")
        good = submit(scheduler, tokenizer, None)
        with pytest.raises(ModelError, match="lora_bias"):
            bad.result()
        assert good.result().completion_tokens == 12
    finally:
        scheduler.close()
        cache.close()


def test_closing_the_loop_fails_the_requests_still_open(base_model, tokenizer, two_adapters):
    reads = GatedReads(base_model, {"slow"})
    cache = AdapterCache(reads)
    cache.register("slow", two_adapters["slow"])
    scheduler = run_loop(base_model, cache)
    waiting = submit(scheduler, tokenizer, "slow")
    scheduler.close()
    reads.gate.set()
    cache.close()
    with pytest.raises(EngineClosedError):
        waiting.result()
    with pytest.raises(EngineClosedError):
        submit(scheduler, tokenizer, None)
