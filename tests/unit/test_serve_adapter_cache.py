"""AdapterCache: budget and LRU eviction, pinning, refcounts, the background loader, content-hash identity.

Most tests use small real adapter folders and a reader that sizes the weights from the saved tensor, so the
budget arithmetic is exact; one test runs the real PEFT reader on the lab model."""

from __future__ import annotations

import functools
import json
import re
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from loraforge.errors import ModelError
from loraforge.serve.engine.adapter_cache import AdapterCache, saved_tensor_bytes
from loraforge.serve.engine.adapter_weights import AdapterWeights, LoraModule, content_hash
from loraforge.serve.engine.errors import UnknownModelError

UNIT = 4096  # bytes of one small adapter: 1024 float32


def write_folder(folder: Path, value: float = 1.0, units: int = 1) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 1, "lora_alpha": 1}))
    tensor = torch.full((units * UNIT // 4,), value)
    save_file({"base_model.model.x.lora_A.weight": tensor}, str(folder / "adapter_model.safetensors"))
    return folder


class Reader:
    """Reads the folders above into AdapterWeights whose nbytes is the tensor's; counts reads; can be gated."""

    def __init__(self):
        self.reads: list[str] = []
        self.gates: dict[str, threading.Event] = {}
        self.fail: dict[str, Exception] = {}
        self.nbytes: dict[str, int] = {}  # weights bigger in memory than on disk (e.g. bf16 files read as float32)

    def __call__(self, name: str, folder: Path) -> AdapterWeights:
        if name in self.gates:
            assert self.gates[name].wait(10), "test gate never opened"
        self.reads.append(name)
        if name in self.fail:
            raise self.fail[name]
        from safetensors.torch import load_file

        t = load_file(str(folder / "adapter_model.safetensors"))["base_model.model.x.lora_A.weight"]
        return AdapterWeights(name=name, content_hash=content_hash(folder), rank=1,
                              modules={"x": LoraModule(a=t, b=t[:0])}, embeddings={}, replaced={},
                              nbytes=self.nbytes.get(name, t.nelement() * 4))


@pytest.fixture
def reader() -> Reader:
    return Reader()


@pytest.fixture
def make_cache(reader):
    caches: list[AdapterCache] = []

    def make(budget: int | None = None, on_lookup=None) -> AdapterCache:
        caches.append(AdapterCache(reader, budget, on_lookup))
        return caches[-1]

    yield make
    for c in caches:
        c.close()


def states(cache: AdapterCache) -> dict[str, str]:
    return {e.name: e.state for e in cache.entries()}


def load(cache: AdapterCache, name: str) -> AdapterWeights:
    return cache.wait_resident(name, timeout=10)


def test_get_misses_then_hits_and_reports_lookups(make_cache, tmp_path):
    lookups: list[tuple[str, bool]] = []
    cache = make_cache(on_lookup=lambda name, hit: lookups.append((name, hit)))
    entry = cache.register("a", write_folder(tmp_path / "a"))
    assert (entry.state, entry.nbytes, entry.pinned) == ("registered", None, False)
    assert entry.content_hash == content_hash(tmp_path / "a")
    assert cache.get("a") is None  # queued for the loader
    w = load(cache, "a")
    assert cache.get("a") is w
    assert lookups == [("a", False), ("a", True)]
    assert cache.entries()[0].state == "resident" and cache.entries()[0].nbytes == UNIT
    with pytest.raises(UnknownModelError, match="'nope' does not exist"):
        cache.get("nope")


def test_lru_eviction_frees_the_least_recently_used(make_cache, tmp_path):
    cache = make_cache(budget=3 * UNIT)
    for name in "abcd":
        cache.register(name, write_folder(tmp_path / name))
    for name in "abc":
        load(cache, name)
    assert cache.get("a") is not None  # a is now more recent than b
    load(cache, "d")
    assert states(cache) == {"a": "resident", "b": "registered", "c": "resident", "d": "resident"}
    assert cache.used_bytes() == 3 * UNIT
    load(cache, "b")  # an evicted adapter loads again, evicting c (now the oldest)
    assert states(cache)["c"] == "registered"


def test_held_adapters_are_never_evicted_and_a_load_waits_for_room(make_cache, reader, tmp_path):
    cache = make_cache(budget=2 * UNIT)
    for name in "abc":
        cache.register(name, write_folder(tmp_path / name))
    wa, wb = load(cache, "a"), load(cache, "b")
    cache.acquire(wa)
    cache.acquire(wb)
    cache.acquire(wb)
    assert cache.get("c") is None
    time.sleep(0.3)  # the loader has read c but everything resident is held
    assert states(cache) == {"a": "resident", "b": "resident", "c": "loading"} and reader.reads.count("c") == 1
    cache.release(wb)
    assert states(cache)["c"] == "loading"  # b is still held once
    cache.release(wb)
    assert states(cache) == {"a": "resident", "b": "registered", "c": "resident"}
    assert reader.reads.count("c") == 1  # placed from the waiting slot, not read again
    cache.release(wa)
    with pytest.raises(ValueError, match="released more often"):
        cache.release(wa)


def test_pinned_adapters_load_at_register_and_are_never_evicted(make_cache, tmp_path):
    cache = make_cache(budget=3 * UNIT)
    assert cache.register("p", write_folder(tmp_path / "p"), pin=True).state == "resident"
    for name in "abc":
        cache.register(name, write_folder(tmp_path / name))
        load(cache, name)
    assert states(cache)["p"] == "resident"
    assert [e.name for e in cache.entries() if e.state == "resident"] == ["p", "b", "c"]
    cache.register("q", write_folder(tmp_path / "q", units=2), pin=True)  # evicts b and c for room
    assert states(cache) == {"p": "resident", "a": "registered", "b": "registered", "c": "registered",
                             "q": "resident"}
    with pytest.raises(ModelError, match=re.escape(f"pinned adapters would take {4 * UNIT} bytes, above the "
                                                   f"adapter cache budget of {3 * UNIT} bytes")):
        cache.register("r", write_folder(tmp_path / "r"), pin=True)
    assert "r" not in states(cache)
    # pinning an already registered adapter loads it and checks the pinned total too
    with pytest.raises(ModelError, match="pinned adapters would take"):
        cache.register("a", tmp_path / "a", pin=True)
    assert not next(e for e in cache.entries() if e.name == "a").pinned
    # pinned adapters fill the budget: an unpinned load can never fit and fails instead of waiting forever
    assert cache.get("a") is None
    with pytest.raises(ModelError, match=re.escape(f"pinned adapters {3 * UNIT} of the {3 * UNIT}-byte")):
        load(cache, "a")


def test_pinning_an_already_registered_adapter(make_cache, reader, tmp_path):
    cache = make_cache(budget=2 * UNIT)
    cache.register("a", write_folder(tmp_path / "a"))
    cache.register("b", write_folder(tmp_path / "b"))
    load(cache, "b")
    entry = cache.register("a", tmp_path / "a", pin=True)  # not resident yet: read now, then pinned
    assert (entry.state, entry.pinned) == ("resident", True)
    load(cache, "b")
    cache.register("c", write_folder(tmp_path / "c"))
    load(cache, "c")  # evicts b, never the pinned a
    assert states(cache) == {"a": "resident", "b": "registered", "c": "resident"}
    assert cache.register("c", tmp_path / "c", pin=True).pinned and reader.reads.count("c") == 1  # kept as is


def test_a_slow_load_never_blocks_lookups_of_resident_adapters(make_cache, reader, tmp_path):
    cache = make_cache()
    cache.register("fast", write_folder(tmp_path / "fast"))
    cache.register("slow", write_folder(tmp_path / "slow"))
    fast = load(cache, "fast")
    reader.gates["slow"] = threading.Event()
    started = time.perf_counter()
    assert cache.get("slow") is None
    for _ in range(100):
        assert cache.get("fast") is fast
    assert cache.entries()[1].state == "loading"
    assert time.perf_counter() - started < 0.5  # while the loader thread is stuck in read("slow")
    reader.gates["slow"].set()
    assert load(cache, "slow").name == "slow"


def test_reregistering_changed_files_serves_new_weights_while_holders_keep_old(make_cache, reader, tmp_path):
    cache = make_cache(budget=2 * UNIT)
    folder = write_folder(tmp_path / "a", value=1.0)
    cache.register("a", folder)
    old = load(cache, "a")
    cache.acquire(old)
    assert cache.register("a", folder).state == "resident" and reader.reads == ["a"]  # same content: kept
    write_folder(folder, value=2.0)
    entry = cache.register("a", folder)
    assert entry.state == "registered" and entry.content_hash != old.content_hash
    assert cache.get("a") is None  # never the stale weights
    new = load(cache, "a")
    assert new.content_hash == entry.content_hash and float(new.modules["x"].a[0]) == 2.0
    assert float(old.modules["x"].a[0]) == 1.0  # the holder's weights are untouched
    assert cache.used_bytes() == 2 * UNIT  # the held old weights still count
    cache.release(old)
    assert cache.used_bytes() == UNIT


def test_reregistering_during_a_load_discards_the_stale_read(make_cache, reader, tmp_path):
    cache = make_cache()
    folder = write_folder(tmp_path / "a", value=1.0)
    cache.register("a", folder)
    reader.gates["a"] = threading.Event()
    cache.get("a")
    time.sleep(0.1)  # the loader is inside read("a") for the old files
    write_folder(folder, value=3.0)
    cache.register("a", folder)
    reader.gates["a"].set()
    assert float(load(cache, "a").modules["x"].a[0]) == 3.0


def test_unregister_while_held(make_cache, tmp_path):
    cache = make_cache()
    cache.register("a", write_folder(tmp_path / "a"))
    cache.register("b", write_folder(tmp_path / "b"))
    w = load(cache, "a")
    cache.acquire(w)
    cache.unregister("a")
    with pytest.raises(UnknownModelError, match="Served models: b"):
        cache.get("a")
    assert float(w.modules["x"].a.sum()) == UNIT // 4  # still usable by its holder
    assert cache.used_bytes() == UNIT
    cache.release(w)
    assert cache.used_bytes() == 0
    with pytest.raises(UnknownModelError):
        cache.unregister("a")


def test_failed_load_reports_the_reason_until_registered_again(make_cache, reader, tmp_path):
    cache = make_cache()
    folder = write_folder(tmp_path / "a")
    cache.register("a", folder)
    reader.fail["a"] = RuntimeError("disk on fire")
    assert cache.get("a") is None
    with pytest.raises(ModelError, match="adapter 'a' failed to load: RuntimeError: disk on fire"):
        cache.wait_resident("a", timeout=10)
    entry = cache.entries()[0]
    assert entry.state == "failed" and entry.error == "RuntimeError: disk on fire"
    with pytest.raises(ModelError, match="disk on fire"):
        cache.get("a")
    del reader.fail["a"]
    assert cache.register("a", folder).state == "registered"  # same files: a retry
    assert load(cache, "a").name == "a"


def test_adapter_bigger_than_the_budget_is_refused_naming_sizes(make_cache, reader, tmp_path):
    cache = make_cache(budget=UNIT)
    with pytest.raises(ModelError, match=re.escape(f"its saved tensors need {2 * UNIT} bytes, the whole budget is "
                                                   f"{UNIT} bytes")):
        cache.register("big", write_folder(tmp_path / "big", units=2))
    assert cache.entries() == []
    small = write_folder(tmp_path / "small")
    cache.register("small", small)
    reader.nbytes["small"] = 3 * UNIT
    cache.get("small")
    with pytest.raises(ModelError, match=re.escape(f"its weights take {3 * UNIT} bytes, the whole budget is {UNIT}")):
        cache.wait_resident("small", timeout=10)


def test_register_validates_the_folder(make_cache, tmp_path):
    cache = make_cache()
    folder = write_folder(tmp_path / "a")
    (folder / "adapter_model.safetensors").rename(folder / "adapter_model.bin")
    with pytest.raises(ModelError, match="pickle"):
        cache.register("a", folder)
    with pytest.raises(ModelError, match="adapter folder not found"):
        cache.register("a", tmp_path / "missing")
    assert saved_tensor_bytes(write_folder(tmp_path / "b", units=3)) == 3 * UNIT


def test_concurrent_lookups_keep_the_budget(make_cache, tmp_path):
    """Threads acting as request handlers: get, hold, release; no errors and the budget holds at rest."""
    cache = make_cache(budget=3 * UNIT)
    names = [f"n{i}" for i in range(8)]
    for name in names:
        cache.register(name, write_folder(tmp_path / name, value=float(len(name))))
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        try:
            for i in range(200):
                name = names[(seed * 7 + i) % len(names)]
                w = cache.get(name)
                if w is not None:
                    cache.acquire(w)
                    assert w.name == name
                    cache.release(w)
        except BaseException as e:  # collected and asserted in the main thread
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors[:1]
    assert cache.used_bytes() <= 3 * UNIT
    assert sum(e.state == "resident" for e in cache.entries()) <= 3


def test_real_peft_reader_serves_new_files_after_reregistering(lab, one_torch_thread, make_cache, tmp_path):
    from lab_adapters import make_random_adapter
    from method_batches import fp32_base

    from loraforge.serve.engine.adapter_weights import read_adapter

    base = fp32_base(str(lab.model_dir))
    cache = AdapterCache(functools.partial(read_adapter, base=base), budget_bytes=10**6)
    try:
        folder = make_random_adapter(lab.model_dir, tmp_path / "x", seed=1, targets=("q_proj",))
        cache.register("x", folder)
        first = cache.wait_resident("x", 30)
        make_random_adapter(lab.model_dir, folder, seed=2, targets=("q_proj",))
        cache.register("x", folder)
        second = cache.wait_resident("x", 30)
        key = "model.layers.0.self_attn.q_proj"
        assert second.content_hash == content_hash(folder) != first.content_hash
        assert not torch.equal(first.modules[key].b, second.modules[key].b)
    finally:
        cache.close()
