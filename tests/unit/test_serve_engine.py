"""The serving engine on the lab model: adapters by name, base, stop strings, eos, request errors, and
continuous batching: mixed-adapter batches equal PEFT alone, seeded sampling, streaming, cancel, hot swap."""

from __future__ import annotations

import asyncio
import json
import shutil
import threading
from pathlib import Path

import pytest
import torch
from lab_adapters import make_adapter_zoo, make_random_adapter
from safetensors.torch import load_file

from loraforge.errors import ModelError
from loraforge.serve.engine import (
    ContextLengthError,
    Engine,
    InvalidParameterError,
    RequestCancelledError,
    SamplingParams,
    UnknownModelError,
    cut_at_stop,
)

MAX_NEW = 24


@pytest.fixture(scope="module")
def adapters(lab, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {name: make_random_adapter(lab.model_dir, root / name, seed) for seed, name in enumerate(["alpha", "beta"])}


@pytest.fixture(scope="module")
def engine(lab, adapters, one_torch_thread) -> Engine:
    engine = Engine(str(lab.model_dir), adapters, base_name="lab", max_new_tokens_limit=64)
    yield engine
    engine.close()


def chat_prompt(tokenizer, text: str) -> str:
    messages = [{"role": "user", "content": text}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def task_prompts(lab, tokenizer, n: int = 2) -> list[str]:
    prompts = []
    for task in lab.tasks:
        with (lab.data_dir / "tasks" / f"{task}_eval.jsonl").open() as fh:
            rows = [json.loads(line) for _, line in zip(range(n), fh, strict=False)]
        for row in rows:
            user = row["instruction"] + (f"\n\n{row['input']}" if row["input"] else "")
            prompts.append(chat_prompt(tokenizer, user))
    return prompts


def reference_ids(model, tokenizer, prompt: str, max_new: int = MAX_NEW) -> list[int]:
    """What transformers' own generate gives greedily for this model alone."""
    enc = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=max_new, do_sample=False,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return out[0, enc["input_ids"].shape[1]:].tolist()


def test_each_adapter_equals_peft_generate_for_that_adapter_alone(lab, adapters, engine):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    tok = engine.tokenizer
    prompts = [task_prompts(lab, tok, n=1)[0], "The"]
    expected: dict[str, list[list[int]]] = {}
    for name, folder in adapters.items():
        alone = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(lab.model_dir), str(folder)).eval()
        expected[name] = [reference_ids(alone, tok, p) for p in prompts]
    assert expected["alpha"] != expected["beta"], "the two random adapters should change the output differently"

    # Interleave adapters so a stale active adapter would show.
    for name in ["alpha", "beta", "alpha"]:
        for prompt, ids in zip(prompts, expected[name], strict=True):
            got = engine.complete(prompt, name, max_tokens=MAX_NEW, temperature=0)
            assert got.text == tok.decode(ids, skip_special_tokens=True)
            assert got.completion_tokens == len(ids)
            assert got.prompt_tokens == len(tok(prompt, add_special_tokens=False)["input_ids"])


def test_base_equals_the_base_model_even_after_adapters_ran(lab, engine):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(lab.model_dir).eval()
    tok = engine.tokenizer
    prompts = [task_prompts(lab, tok, n=1)[0], "The"]
    adapted, plain = [], []
    for prompt in prompts:
        ids = reference_ids(base, tok, prompt)
        # Run an adapter first: the base must not see a leftover active adapter.
        adapted.append(engine.complete(prompt, "alpha", max_tokens=MAX_NEW, temperature=0).text)
        for served_name in ("lab", "base"):
            got = engine.complete(prompt, served_name, max_tokens=MAX_NEW, temperature=0)
            assert got.text == tok.decode(ids, skip_special_tokens=True)
            assert got.completion_tokens == len(ids)
        plain.append(got.text)
    assert adapted != plain


def test_generation_stops_at_eos_and_reports_stop(lab, engine):
    eos = engine.tokenizer.eos_token_id
    results = [engine.complete(p, "lab", max_tokens=64, temperature=0) for p in task_prompts(lab, engine.tokenizer)]
    ended = [r for r in results if r.finish_reason == "stop"]
    assert ended, "the lab model answers chat prompts and ends its turn with eos"
    for r in ended:
        assert r.completion_tokens < 64
        assert engine.tokenizer.eos_token not in r.text
    # Cross-check one against the raw token stream: the last generated id is eos.
    prompt = task_prompts(lab, engine.tokenizer)[results.index(ended[0])]
    from transformers import AutoModelForCausalLM

    ids = reference_ids(AutoModelForCausalLM.from_pretrained(lab.model_dir).eval(), engine.tokenizer, prompt, 64)
    assert ids[-1] == eos and len(ids) == ended[0].completion_tokens


def test_max_tokens_reached_reports_length(engine):
    r = engine.complete("The", "lab", max_tokens=5, temperature=0)
    assert r.finish_reason == "length" and r.completion_tokens == 5


def test_stop_strings_cut_the_text_and_stop_generation(engine):
    full = engine.complete("The", "beta", max_tokens=40, temperature=0)
    assert len(full.text) > 12, full
    stop = full.text[6:9]
    cut = full.text[: full.text.find(stop)]
    got = engine.complete("The", "beta", max_tokens=40, temperature=0, stop=["never-appears-xyz", stop])
    assert got.text == cut
    assert got.finish_reason == "stop"
    assert got.completion_tokens < full.completion_tokens


def test_cut_at_stop_takes_the_earliest_stop():
    assert cut_at_stop("abc<END>def<X>", ["<X>", "<END>"]) == ("abc", True)
    assert cut_at_stop("abc", ["z"]) == ("abc", False)


def test_seeded_sampling_repeats(engine):
    a = engine.complete("The", "alpha", max_tokens=16, temperature=1.0, top_p=0.9, seed=7)
    b = engine.complete("The", "alpha", max_tokens=16, temperature=1.0, top_p=0.9, seed=7)
    assert a == b


def test_models_lists_base_then_adapters(engine):
    assert engine.models() == ["lab", "alpha", "beta"]


def test_unknown_model_is_a_specific_error(engine):
    with pytest.raises(UnknownModelError) as info:
        engine.complete("The", "gamma", max_tokens=4, temperature=0)
    assert info.value.status == 404 and info.value.code == "model_not_found" and info.value.param == "model"
    assert "gamma" in str(info.value) and "alpha" in str(info.value)


def test_prompt_longer_than_the_context_is_refused(engine):
    long_prompt = "The mayor is green. " * (engine.context_length // 2)
    with pytest.raises(ContextLengthError) as info:
        engine.complete(long_prompt, "alpha", max_tokens=4, temperature=0)
    assert info.value.status == 400 and str(engine.context_length) in str(info.value)


@pytest.mark.parametrize("max_tokens", [0, -1, 65])
def test_max_tokens_out_of_range_is_refused(engine, max_tokens):
    with pytest.raises(InvalidParameterError) as info:
        engine.complete("The", "lab", max_tokens=max_tokens, temperature=0)
    assert info.value.param == "max_tokens" and "64" in str(info.value)


def test_pickled_bin_adapter_is_refused(lab, adapters, tmp_path):
    folder = tmp_path / "pickled"
    shutil.copytree(adapters["alpha"], folder)
    weights = folder / "adapter_model.safetensors"
    torch.save(load_file(weights), folder / "adapter_model.bin")
    weights.unlink()
    with pytest.raises(ModelError, match="adapter_model.bin"):
        Engine(str(lab.model_dir), {"pickled": folder})


def test_missing_adapter_folder_and_name_clash_are_model_errors(lab, adapters, tmp_path):
    with pytest.raises(ModelError, match="not found"):
        Engine(str(lab.model_dir), {"gone": tmp_path / "nope"})
    with pytest.raises(ModelError, match="clashes"):
        Engine(str(lab.model_dir), {"base": adapters["alpha"]})


# ------------------------------------------------------------------ continuous batching
def collect(stream) -> tuple[list[int], str, str | None]:
    """Token ids, joined delta text and finish reason of a stream, read to its end."""
    ids: list[int] = []
    text = ""
    finish = None
    for delta in stream:
        ids.extend(delta.token_ids)
        text += delta.text
        finish = delta.finish_reason
    return ids, text, finish


def test_mixed_adapter_batches_equal_peft_generate_for_each_adapter_alone(lab, tmp_path_factory, one_torch_thread):
    """8 adapters of ranks 2..16 (+ rsLoRA) and the base, 2 prompts each, submitted concurrently into 6 slots
    with 8-token prefill chunks: requests join while others decode, and each equals PEFT for its adapter alone."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    zoo = make_adapter_zoo(lab.model_dir, tmp_path_factory.mktemp("zoo"), count=8)
    engine = Engine(str(lab.model_dir), zoo, base_name="lab", max_batch_size=6, prefill_tokens=8, max_len=256)
    try:
        tok = engine.tokenizer
        prompts = [task_prompts(lab, tok, n=1)[1], "The mayor is green. The baker is"]
        lengths = [MAX_NEW, MAX_NEW - 7]
        expected: dict[str, list[list[int]]] = {}
        for name in ["lab", *zoo]:
            model = AutoModelForCausalLM.from_pretrained(lab.model_dir)
            if name != "lab":
                model = PeftModel.from_pretrained(model, str(zoo[name]))
            expected[name] = [reference_ids(model.eval(), tok, p, n) for p, n in zip(prompts, lengths, strict=True)]
        distinct = {tuple(v[0] + v[1]) for v in expected.values()}
        assert len(distinct) == len(expected), "every adapter changes the output: a mix-up would show"

        jobs = [(name, i) for i in range(2) for name in expected]
        params = [SamplingParams(max_tokens=lengths[i], temperature=0) for _, i in jobs]
        streams = [engine.submit(prompts[i], name, p) for (name, i), p in zip(jobs[:5], params, strict=False)]
        first = iter(streams[0])
        early = [next(first) for _ in range(3)]  # the first requests are decoding when the rest arrive
        streams += [engine.submit(prompts[i], name, p) for (name, i), p in zip(jobs[5:], params[5:], strict=True)]

        rest = collect(first)
        results = [([t for d in early for t in d.token_ids] + rest[0], "".join(d.text for d in early) + rest[1])]
        results += [collect(s)[:2] for s in streams[1:]]
        for (name, i), (ids, text) in zip(jobs, results, strict=True):
            assert ids == expected[name][i], f"{name} on prompt {i}"
            assert text == tok.decode(ids, skip_special_tokens=True)
    finally:
        engine.close()


@pytest.fixture(scope="module")
def small_engine(lab, adapters, one_torch_thread) -> Engine:
    """4 slots, room for 96 tokens per request."""
    engine = Engine(str(lab.model_dir), adapters, base_name="lab", max_batch_size=4, max_len=96)
    yield engine
    engine.close()


def test_a_seeded_sampled_request_repeats_alone_and_in_a_busy_mixed_batch(small_engine):
    seeded = SamplingParams(max_tokens=40, temperature=0.9, top_p=0.95, seed=1234)
    alone, _, _ = collect(small_engine.submit("The mayor", "alpha", seeded))

    others = [
        small_engine.submit("The", "beta", SamplingParams(max_tokens=60, temperature=1.0, ignore_eos=True)),
        small_engine.submit("The baker is", "lab", SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)),
    ]
    busy, _, _ = collect(small_engine.submit("The mayor", "alpha", seeded))
    others.append(small_engine.submit("The mayor", "alpha", SamplingParams(max_tokens=40, temperature=0.9, seed=99)))
    again, _, _ = collect(small_engine.submit("The mayor", "alpha", seeded))
    for s in others:
        s.result()
    assert alone == busy == again
    unseeded = [collect(small_engine.submit("The mayor", "alpha", SamplingParams(max_tokens=40)))[0] for _ in range(2)]
    assert unseeded[0] != unseeded[1], "without a seed each request draws its own tokens"


def test_streamed_deltas_join_to_the_final_text_with_a_stop_string_spanning_tokens(small_engine):
    tok = small_engine.tokenizer
    params = SamplingParams(max_tokens=60, temperature=0)
    ids, text, _ = collect(small_engine.submit("The", "beta", params))
    assert text == small_engine.submit("The", "beta", params).result().text == tok.decode(ids, skip_special_tokens=True)

    # A stop string that starts inside one token and ends inside a later one.
    pieces = [tok.decode([i]) for i in ids]
    ends = [sum(len(p) for p in pieces[: k + 1]) for k in range(len(pieces))]
    k = next(k for k in range(2, len(pieces) - 2) if len(pieces[k]) >= 2 and len(pieces[k + 1]) >= 1)
    stop = text[ends[k] - 1 : ends[k + 1] + 1]
    assert len(stop) >= 3 and text.find(stop) == ends[k] - 1, "the stop string spans three tokens"

    stream = small_engine.submit("The", "beta", SamplingParams(max_tokens=60, temperature=0, stop=("zz-none", stop)))
    deltas = list(stream)
    joined = "".join(d.text for d in deltas)
    assert joined == text[: ends[k] - 1] == stream.result().text
    assert deltas[-1].finish_reason == "stop" and all(d.finish_reason is None for d in deltas[:-1])
    assert deltas[-1].completion_tokens == k + 3 < len(ids), "generation stopped at the token ending the stop string"


def test_async_streaming_through_the_engine(small_engine):
    expected = small_engine.complete("The", "alpha", max_tokens=20, temperature=0)

    async def read() -> tuple[str, int]:
        stream = small_engine.submit("The", "alpha", SamplingParams(max_tokens=20, temperature=0))
        text, n = "", 0
        async for delta in stream:
            text, n = text + delta.text, delta.completion_tokens
        return text, n

    assert asyncio.run(read()) == (expected.text, expected.completion_tokens)


def test_cancel_frees_the_slot_for_the_next_request(lab, adapters, one_torch_thread):
    engine = Engine(str(lab.model_dir), adapters, base_name="lab", max_batch_size=1, max_new_tokens_limit=256)
    try:
        long = engine.submit("The", "alpha", SamplingParams(max_tokens=250, temperature=0, ignore_eos=True))
        first = next(iter(long))
        assert first.completion_tokens >= 1
        waiting = engine.submit("The", "beta", SamplingParams(max_tokens=8, temperature=0))
        long.cancel()
        done = threading.Event()
        threading.Thread(target=lambda: (waiting.result(), done.set()), daemon=True).start()
        assert done.wait(30), "the cancelled request's slot went to the waiting one"
        assert waiting.result().completion_tokens == 8
        with pytest.raises(RequestCancelledError):
            long.result()
        assert list(long) == []
    finally:
        engine.close()


def test_replacing_an_adapter_serves_the_new_weights_and_running_requests_keep_theirs(small_engine, adapters):
    params = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    want_alpha = small_engine.submit("The", "alpha", params).result().text
    want_beta = small_engine.submit("The", "beta", params).result().text
    assert want_alpha != want_beta

    small_engine.add_adapter("swap", adapters["alpha"])
    old = small_engine.submit("The", "swap", params)
    next(iter(old))  # running on alpha's weights
    info = small_engine.add_adapter("swap", adapters["beta"])
    assert info.content_hash == next(i for i in small_engine.model_info() if i.name == "beta").content_hash
    assert small_engine.submit("The", "swap", params).result().text == want_beta
    assert old.result().text == want_alpha
    small_engine.remove_adapter("swap")


def test_removed_adapter_is_unknown_for_new_requests_while_running_ones_finish(small_engine, adapters):
    small_engine.add_adapter("gone", adapters["beta"])
    assert small_engine.models()[-1] == "gone"
    running = small_engine.submit("The", "gone", SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))
    next(iter(running))
    small_engine.remove_adapter("gone")
    assert running.result().completion_tokens == 30
    with pytest.raises(UnknownModelError) as info:
        small_engine.submit("The", "gone", SamplingParams(temperature=0))
    assert info.value.status == 404 and "gone" not in small_engine.models()
    with pytest.raises(UnknownModelError):
        small_engine.remove_adapter("gone")


def test_model_info_lists_base_and_adapters_with_state_rank_and_pinning(lab, adapters, one_torch_thread):
    engine = Engine(str(lab.model_dir), adapters, base_name="lab", pinned=["beta"], max_len=64)
    try:
        info = {i.name: i for i in engine.model_info()}
        assert [i.name for i in engine.model_info()] == ["lab", "alpha", "beta"]
        assert info["lab"].kind == "base" and info["lab"].content_hash is None
        assert info["beta"].pinned and info["beta"].state == "resident", "pinned adapters load at start"
        assert not info["alpha"].pinned and info["alpha"].state == "registered", "others load on first use"
        assert info["alpha"].rank == 4 and len(info["alpha"].content_hash) == 64
        engine.complete("The", "alpha", max_tokens=2, temperature=0)
        assert {i.name: i for i in engine.model_info()}["alpha"].state == "resident"
    finally:
        engine.close()
    with pytest.raises(ModelError, match="pinned"):
        Engine(str(lab.model_dir), adapters, pinned=["nope"])


def test_requests_that_do_not_fit_the_kv_length_or_the_vocabulary_are_refused(small_engine):
    assert small_engine.context_length == 96
    with pytest.raises(ContextLengthError) as info:
        small_engine.submit("The mayor is green. " * 12, "lab", SamplingParams(max_tokens=40))
    assert "96" in str(info.value) and info.value.param == "max_tokens"
    with pytest.raises(InvalidParameterError, match="token ids") as bad:
        small_engine.submit([5, 99999], "lab", SamplingParams())
    assert bad.value.param == "prompt"
    with pytest.raises(InvalidParameterError, match="empty"):
        small_engine.submit([], "lab", SamplingParams())
    ids = small_engine.encode("The")
    assert small_engine.submit(ids, "lab", SamplingParams(max_tokens=5, temperature=0)).result() == (
        small_engine.complete("The", "lab", max_tokens=5, temperature=0)
    )


def test_metrics_hooks_see_queue_first_tokens_generated_and_cache_lookups(lab, adapters, one_torch_thread):
    class Recorder:
        def __init__(self) -> None:
            self.calls: list[tuple] = []

        def queue_length(self, waiting: int, running: int) -> None:
            self.calls.append(("queue", waiting, running))

        def first_token(self, model: str, seconds: float) -> None:
            self.calls.append(("first", model, seconds))

        def generated(self, model: str, tokens: int, seconds: float) -> None:
            self.calls.append(("generated", model, tokens, seconds))

        def cache_lookup(self, model: str, hit: bool) -> None:
            self.calls.append(("lookup", model, hit))

    metrics = Recorder()
    engine = Engine(str(lab.model_dir), adapters, base_name="lab", max_len=64, metrics=metrics)
    try:
        engine.complete("The", "alpha", max_tokens=5, temperature=0)
        engine.complete("The", "alpha", max_tokens=5, temperature=0)
        engine.complete("The", "lab", max_tokens=3, temperature=0)
    finally:
        engine.close()
    assert [c[1:] for c in metrics.calls if c[0] == "lookup"] == [("alpha", False), ("alpha", True)]
    assert [c[1] for c in metrics.calls if c[0] == "first"] == ["alpha", "alpha", "lab"]
    assert [c[1:3] for c in metrics.calls if c[0] == "generated"] == [("alpha", 5), ("alpha", 5), ("lab", 3)]
    queue = [c[1:] for c in metrics.calls if c[0] == "queue"]
    assert (1, 0) in queue and (0, 1) in queue and queue[-1] == (0, 0)
