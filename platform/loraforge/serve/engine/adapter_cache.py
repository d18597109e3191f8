"""Adapters resident in memory under a byte budget: LRU eviction, pinning, one background loader thread.

The engine's step loop calls `get()` every step; it must never wait for a file read, so a non-resident adapter
is queued for the loader thread and `get()` returns None (the request waits, others run). Weights a request
holds (`acquire`) are never evicted and stay valid for that holder even after the adapter is re-registered
with new files or unregistered: new lookups see only the current content, identified by its hash.
"""

from __future__ import annotations

import itertools
import json
import math
import queue
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from loraforge.errors import ModelError
from loraforge.serve.engine.adapter_weights import AdapterWeights, content_hash
from loraforge.serve.engine.errors import UnknownModelError
from loraforge.serve.engine.folders import ADAPTER_WEIGHTS, check_adapter_dir

AdapterState = Literal["registered", "loading", "resident", "failed"]

_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


@dataclass(frozen=True)
class AdapterEntry:
    name: str
    folder: Path
    content_hash: str
    state: AdapterState
    pinned: bool
    nbytes: int | None  # known once loaded
    error: str | None  # the load error when state is "failed"


class _Slot:
    """Mutable bookkeeping for one registered name; `generation` changes on every re-registration."""

    def __init__(self, name: str, folder: Path, digest: str, pinned: bool, generation: int):
        self.name, self.folder, self.content_hash, self.pinned = name, folder, digest, pinned
        self.generation = generation
        self.state: AdapterState = "registered"
        self.weights: AdapterWeights | None = None
        self.error: str | None = None
        self.last_used = 0

    def entry(self) -> AdapterEntry:
        nbytes = self.weights.nbytes if self.weights is not None else None
        return AdapterEntry(self.name, self.folder, self.content_hash, self.state, self.pinned, nbytes, self.error)


def saved_tensor_bytes(folder: Path) -> int:
    """Bytes of the adapter's saved tensors at float32 or wider, read from the safetensors header only;
    PEFT's copies of embedding base weights (`.base_layer.`) are left out: the reader drops unchanged ones."""
    path = Path(folder) / ADAPTER_WEIGHTS
    try:
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
    except (OSError, ValueError, struct.error) as e:
        raise ModelError(f"{path} is not a readable safetensors file: {e}") from e
    total = 0
    for key, info in header.items():
        if key == "__metadata__" or ".base_layer." in key:
            continue
        total += math.prod(info["shape"]) * max(4, _DTYPE_BYTES.get(info["dtype"], 4))
    return total


class AdapterCache:
    def __init__(self, read: Callable[[str, Path], AdapterWeights], budget_bytes: int | None = None,
                 on_lookup: Callable[[str, bool], None] | None = None):
        if budget_bytes is not None and budget_bytes <= 0:
            raise ModelError(f"adapter cache budget must be positive bytes or None (unlimited), got {budget_bytes}")
        self._read = read
        self._budget = budget_bytes
        self._on_lookup = on_lookup
        self._lock = threading.Condition(threading.RLock())
        self._slots: dict[str, _Slot] = {}  # registration order
        self._held: dict[int, tuple[AdapterWeights, int]] = {}  # id(weights) -> (weights, refcount)
        self._waiting: dict[str, AdapterWeights] = {}  # loaded, waiting for held adapters to free room
        self._generations = itertools.count(1)
        self._ticks = itertools.count(1)
        self._queue: queue.Queue[tuple[str, int] | None] = queue.Queue()
        self._closed = False
        self._loader = threading.Thread(target=self._load_loop, name="adapter-loader", daemon=True)
        self._loader.start()

    # --- registration ---------------------------------------------------------------------------------------

    def register(self, name: str, folder: Path, pin: bool = False) -> AdapterEntry:
        """Validate and hash the folder; a pinned adapter is loaded now and never evicted. Re-registering a name
        with other content replaces it: old weights live on only for requests that hold them. A refused
        registration (bad folder, too big, failed pinned load) leaves any previous one in place."""
        folder = check_adapter_dir(folder)
        digest = content_hash(folder)
        self._check_fits(name, saved_tensor_bytes(folder), "its saved tensors need")
        weights = None
        with self._lock:
            self._check_open()
            same = self._slots.get(name)
            if same is not None and (same.content_hash != digest or same.state == "failed"):
                same = None
            if same is not None:
                same.folder = folder
                if not pin or same.pinned:
                    return same.entry()
                weights = same.weights
        if pin and weights is None:
            weights = self._read_checked(name, folder, digest)  # pinned: read now, in the caller's thread
        with self._lock:
            self._check_open()
            old = self._slots.get(name)
            if weights is not None:
                self._check_pinned_total(name, weights.nbytes, exclude=old)
            if same is not None and old is same:  # pinning an adapter registered with the same content
                slot = same
                slot.pinned = True
                if slot.weights is not weights:
                    self._waiting.pop(name, None)
                    self._make_room(weights.nbytes, keep=slot)
                    self._set_resident(slot, weights)
                return slot.entry()
            slot = _Slot(name, folder, digest, pin, next(self._generations))
            if old is not None:
                self._drop(old)
            self._slots[name] = slot  # a re-registered name keeps its place in the registration order
            if weights is not None:
                self._make_room(weights.nbytes, keep=slot)
                self._set_resident(slot, weights)
            return slot.entry()

    def unregister(self, name: str) -> None:
        """Forget `name`; requests holding its weights finish with them, new lookups raise UnknownModelError."""
        with self._lock:
            slot = self._slots.pop(name, None)
            if slot is None:
                raise UnknownModelError(name, list(self._slots))
            self._drop(slot)
            self._lock.notify_all()

    def entries(self) -> list[AdapterEntry]:
        with self._lock:
            return [s.entry() for s in self._slots.values()]

    def used_bytes(self) -> int:
        """Bytes of resident adapters plus replaced or unregistered weights still held by requests."""
        with self._lock:
            return self._used()

    # --- lookups --------------------------------------------------------------------------------------------

    def get(self, name: str) -> AdapterWeights | None:
        """The resident weights (an LRU hit), or None after queueing a background load (a miss)."""
        with self._lock:
            slot = self._lookup(name)
            hit = slot.state == "resident"
            if hit:
                slot.last_used = next(self._ticks)
            elif slot.state == "registered":
                self._queue_load(slot)
            weights = slot.weights
        if self._on_lookup is not None:
            self._on_lookup(name, hit)
        return weights

    def wait_resident(self, name: str, timeout: float) -> AdapterWeights:
        """Block until `name` is resident (loading it if needed); ModelError if its load fails."""
        with self._lock:
            ok = self._lock.wait_for(lambda: self._ready(name), timeout)
            slot = self._lookup(name)
            if not ok:
                raise TimeoutError(f"adapter {name!r} not resident after {timeout:g} s (state {slot.state})")
            slot.last_used = next(self._ticks)
            assert slot.weights is not None
            return slot.weights

    def acquire(self, w: AdapterWeights) -> None:
        """Hold `w` for a request: never evicted, and valid after re-registration or unregistration."""
        with self._lock:
            _, count = self._held.get(id(w), (w, 0))
            self._held[id(w)] = (w, count + 1)

    def release(self, w: AdapterWeights) -> None:
        with self._lock:
            held = self._held.get(id(w))
            if held is None:
                raise ValueError(f"adapter weights {w.name!r} released more often than acquired")
            if held[1] > 1:
                self._held[id(w)] = (w, held[1] - 1)
                return
            del self._held[id(w)]
            self._place_waiting()
            self._make_room(0)  # pinning or held weights may have pushed the cache over budget

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._lock.notify_all()
        self._queue.put(None)
        self._loader.join(timeout=30)

    # --- internals (call with the lock held unless noted) ---------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise ModelError("the adapter cache is closed")

    def _lookup(self, name: str) -> _Slot:
        self._check_open()
        slot = self._slots.get(name)
        if slot is None:
            raise UnknownModelError(name, list(self._slots))
        if slot.state == "failed":
            raise ModelError(f"adapter {name!r} failed to load: {slot.error}")
        return slot

    def _ready(self, name: str) -> bool:
        slot = self._slots.get(name)
        if slot is None or slot.state in ("resident", "failed") or self._closed:
            return True
        if slot.state == "registered":
            self._queue_load(slot)
        return False

    def _queue_load(self, slot: _Slot) -> None:
        slot.state = "loading"
        self._queue.put((slot.name, slot.generation))

    def _check_fits(self, name: str, nbytes: int, what: str) -> None:
        if self._budget is not None and nbytes > self._budget:
            raise ModelError(f"adapter {name!r} cannot fit the adapter cache: {what} {nbytes} bytes, "
                             f"the whole budget is {self._budget} bytes")

    def _pinned_bytes(self, exclude: _Slot | None = None) -> int:
        return sum(s.weights.nbytes for s in self._slots.values()
                   if s.pinned and s is not exclude and s.weights is not None)

    def _check_pinned_total(self, name: str, nbytes: int, exclude: _Slot | None = None) -> None:
        pinned = self._pinned_bytes(exclude)
        if self._budget is not None and pinned + nbytes > self._budget:
            raise ModelError(f"cannot pin adapter {name!r} ({nbytes} bytes): pinned adapters would take "
                             f"{pinned + nbytes} bytes, above the adapter cache budget of {self._budget} bytes")

    def _drop(self, slot: _Slot) -> None:
        """Detach a replaced or unregistered slot; held weights stay accounted until released."""
        slot.generation = -1
        slot.weights = None
        self._waiting.pop(slot.name, None)

    def _used(self) -> int:
        current = {id(s.weights) for s in self._slots.values() if s.weights is not None}
        resident = sum(s.weights.nbytes for s in self._slots.values() if s.weights is not None)
        return resident + sum(w.nbytes for key, (w, _) in self._held.items() if key not in current)

    def _make_room(self, nbytes: int, keep: _Slot | None = None) -> bool:
        """Evict least-recently-used unheld unpinned adapters until `nbytes` more fit; False if they cannot."""
        if self._budget is None:
            return True
        candidates = sorted((s for s in self._slots.values() if s.state == "resident" and not s.pinned
                             and s is not keep and id(s.weights) not in self._held), key=lambda s: s.last_used)
        for slot in candidates:
            if self._used() + nbytes <= self._budget:
                break
            slot.weights, slot.state = None, "registered"
        return self._used() + nbytes <= self._budget

    def _set_resident(self, slot: _Slot, weights: AdapterWeights) -> None:
        slot.weights, slot.state, slot.error = weights, "resident", None
        slot.last_used = next(self._ticks)
        self._lock.notify_all()

    def _place_waiting(self) -> None:
        for name, weights in list(self._waiting.items()):
            slot = self._slots.get(name)
            if slot is None or slot.content_hash != weights.content_hash:
                del self._waiting[name]
            elif self._make_room(weights.nbytes, keep=slot):
                del self._waiting[name]
                self._set_resident(slot, weights)

    def _read_checked(self, name: str, folder: Path, digest: str) -> AdapterWeights:
        """Call the reader (no lock held); ModelError unless it returns the registered content within budget."""
        try:
            weights = self._read(name, folder)
        except ModelError:
            raise
        except Exception as e:  # any reader error becomes the adapter's failure reason, not a dead loader
            raise ModelError(f"{type(e).__name__}: {e}") from e
        self._check_fits(name, weights.nbytes, "its weights take")
        if weights.content_hash != digest:
            raise ModelError(f"adapter {name!r}: files in {folder} changed while loading (hash "
                             f"{weights.content_hash[:12]}, registered {digest[:12]}); register it again")
        return weights

    def _load_loop(self) -> None:
        while (item := self._queue.get()) is not None:
            name, generation = item
            with self._lock:
                slot = self._slots.get(name)
                if slot is None or slot.generation != generation or slot.state != "loading":
                    continue
            try:
                weights = self._read_checked(name, slot.folder, slot.content_hash)
            except ModelError as e:
                with self._lock:
                    if slot.generation == generation:
                        slot.state, slot.error = "failed", str(e)
                        self._lock.notify_all()
                continue
            with self._lock:
                if self._slots.get(name) is not slot or slot.generation != generation:
                    continue  # replaced or unregistered meanwhile: the new registration loads its own files
                if self._make_room(weights.nbytes, keep=slot):
                    self._set_resident(slot, weights)
                elif self._budget is not None and self._pinned_bytes() + weights.nbytes > self._budget:
                    slot.state = "failed"
                    slot.error = (f"its weights take {weights.nbytes} bytes and pinned adapters "
                                  f"{self._pinned_bytes()} of the {self._budget}-byte adapter cache budget")
                    self._lock.notify_all()
                else:
                    self._waiting[name] = weights  # every evictable byte is held: place it on a release
