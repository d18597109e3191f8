"""Continuous batching: one loop thread admits requests into free KV slots, runs the new requests' prompt
chunks together with one decode token for every running request in a single forward, samples, streams
the new text and retires finished or cancelled requests, each step."""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch

from loraforge.errors import LoraforgeError
from loraforge.serve.engine.detok import IncrementalDetokenizer
from loraforge.serve.engine.runner import ModelRunner, SeqChunk
from loraforge.serve.engine.sampling import Sampler, SamplingParams, choose_tokens
from loraforge.serve.engine.types import Completion, FinishReason

if TYPE_CHECKING:
    from loraforge.serve.engine.adapter_cache import AdapterCache
    from loraforge.serve.engine.adapter_weights import AdapterWeights

log = logging.getLogger(__name__)

LOAD_POLL_S = 0.5  # safety net only: a watcher thread wakes the loop when a waited-for adapter is loaded


class RequestCancelledError(LoraforgeError):
    """result() of a request its client cancelled."""


class EngineClosedError(LoraforgeError):
    """The engine shut down before the request finished."""


@dataclass(frozen=True)
class Delta:
    """One streamed piece of a completion."""

    text: str  # new text since the previous Delta (text that may start a stop string is held back)
    token_ids: tuple[int, ...]
    finish_reason: FinishReason | None  # set on the last Delta only
    prompt_tokens: int
    completion_tokens: int  # so far


class EngineMetrics(Protocol):
    """Called from the engine's loop thread."""

    def queue_length(self, waiting: int, running: int) -> None: ...
    def first_token(self, model: str, seconds: float) -> None: ...
    def generated(self, model: str, tokens: int, seconds: float) -> None: ...
    def cache_lookup(self, model: str, hit: bool) -> None: ...


class NoMetrics:
    def queue_length(self, waiting: int, running: int) -> None:
        pass

    def first_token(self, model: str, seconds: float) -> None:
        pass

    def generated(self, model: str, tokens: int, seconds: float) -> None:
        pass

    def cache_lookup(self, model: str, hit: bool) -> None:
        pass


_CANCELLED = object()  # stream item: the client cancelled


def _delta_or_end(item: object) -> Delta | None:
    """A stream item as a consumer sees it: a Delta, None when the client cancelled; a failure is raised."""
    if item is _CANCELLED:
        return None
    if isinstance(item, BaseException):
        raise item
    assert isinstance(item, Delta)
    return item


class RequestStream:
    """The deltas of one request, pushed by the engine's loop thread and read by one consumer, blocking
    (`for delta in stream`) or from asyncio (`async for delta in stream`). An asyncio consumer that stops
    before the last delta (its task cancelled when an HTTP client disconnects) cancels the request, so the
    slot is freed; a blocking reader calls cancel() itself."""

    def __init__(self, request_id: str, model: str, prompt_tokens: int, on_cancel: Callable[[], None]):
        self.id = request_id
        self.model = model
        self.prompt_tokens = prompt_tokens
        self._on_cancel = on_cancel
        self._cond = threading.Condition()
        self._items: deque[object] = deque()  # Delta, an exception, or _CANCELLED; the last two stay put
        self._wakers: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
        self._parts: list[str] = []
        self._completion_tokens = 0
        self._finish: FinishReason | None = None
        self._ended = False  # last delta, an error or a cancel was recorded

    # ---------------------------------------------------------- engine side
    @property
    def cancelled(self) -> bool:
        with self._cond:
            return bool(self._items) and self._items[-1] is _CANCELLED

    def push(self, delta: Delta) -> None:
        with self._cond:
            if self._ended:
                return
            self._parts.append(delta.text)
            self._completion_tokens = delta.completion_tokens
            self._finish = delta.finish_reason
            self._ended = delta.finish_reason is not None
            self._items.append(delta)
        self._wake()

    def fail(self, error: BaseException) -> None:
        with self._cond:
            if self._ended:
                return
            self._ended = True
            self._items.append(error)
        self._wake()

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()
            wakers = list(self._wakers)
        for loop, event in wakers:
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # the consumer's event loop is closed: nobody is listening
                pass

    # ---------------------------------------------------------- consumer side
    def cancel(self) -> None:
        """The client is gone: the engine frees the request's slot at its next step."""
        with self._cond:
            if self._ended:
                return
            self._ended = True
            self._items.clear()  # undelivered deltas are dropped: nobody is reading them
            self._items.append(_CANCELLED)
        self._wake()
        self._on_cancel()

    def _pop(self) -> object | None:
        """The next item, or None if there is none yet. Terminal items are left for the next reader."""
        if not self._items:
            return None
        item = self._items[0]
        if isinstance(item, Delta):
            self._items.popleft()
        return item

    def __iter__(self) -> Iterator[Delta]:
        while True:
            with self._cond:
                item = self._pop()
                while item is None:
                    self._cond.wait()
                    item = self._pop()
            delta = _delta_or_end(item)
            if delta is None:
                return
            yield delta
            if delta.finish_reason is not None:
                return

    def __aiter__(self) -> AsyncIterator[Delta]:
        return self._aiter()

    async def _aiter(self) -> AsyncIterator[Delta]:
        waker = (asyncio.get_running_loop(), asyncio.Event())
        with self._cond:
            self._wakers.append(waker)
        done = False
        try:
            while True:
                waker[1].clear()
                with self._cond:
                    item = self._pop()
                if item is None:
                    await waker[1].wait()
                    continue
                done = not isinstance(item, Delta) or item.finish_reason is not None
                delta = _delta_or_end(item)
                if delta is None:
                    return
                yield delta
                if done:
                    return
        finally:
            with self._cond:
                self._wakers.remove(waker)
            if not done:
                self.cancel()

    def result(self) -> Completion:
        """Wait for the end and return the whole completion (whatever an iterator already consumed)."""
        with self._cond:
            while not self._ended:
                self._cond.wait()
            last = self._items[-1] if self._items else None
            if last is _CANCELLED:
                raise RequestCancelledError(f"request {self.id} was cancelled")
            if isinstance(last, BaseException):
                raise last
            assert self._finish is not None
            return Completion("".join(self._parts), self.prompt_tokens, self._completion_tokens, self._finish)


# ------------------------------------------------------------------ requests inside the loop
_ids = itertools.count()


@dataclass(eq=False)
class Request:
    """One request's state in the loop. `cached` counts the tokens whose K/V sit in its slot."""

    model: str  # the served name asked for (metrics labels)
    adapter: str | None  # None = the base model
    prompt_ids: list[int]
    params: SamplingParams
    sampler: Sampler
    detok: IncrementalDetokenizer
    stream: RequestStream
    submitted: float = field(default_factory=time.monotonic)
    weights: AdapterWeights | None = None
    slot: int | None = None
    cached: int = 0
    output_ids: list[int] = field(default_factory=list)
    looked_up: bool = False

    @property
    def prefilled(self) -> bool:
        return self.cached >= len(self.prompt_ids)


def new_request(
    model: str, adapter: str | None, prompt_ids: list[int], params: SamplingParams, tokenizer,
    on_cancel: Callable[[], None],
) -> Request:
    stream = RequestStream(f"cmpl-{next(_ids)}", model, len(prompt_ids), on_cancel)
    return Request(model, adapter, prompt_ids, params, Sampler(params), IncrementalDetokenizer(tokenizer, params.stop),
                   stream)


# ------------------------------------------------------------------ the loop
class Scheduler:
    """Runs requests on a ModelRunner, their adapters fetched from an AdapterCache.

    `lookup(adapter_name)` returns resident weights or None while they load (the facade raises
    UnknownModelError there for names it does not serve). A request whose adapter is loading waits
    without holding back the requests behind it. At most `max_batch_size` requests run at once (each
    owns a KV slot); per step at most `prefill_tokens` prompt tokens run, so running decodes keep flowing
    while long prompts are prefilled in chunks."""

    def __init__(
        self,
        runner: ModelRunner,
        cache: AdapterCache,
        lookup: Callable[[str], AdapterWeights | None],
        eos_ids: Sequence[int],
        *,
        max_batch_size: int,
        prefill_tokens: int = 512,
        metrics: EngineMetrics | None = None,
    ):
        if max_batch_size < 1 or prefill_tokens < 1:
            raise ValueError("max_batch_size and prefill_tokens must be at least 1")
        self.runner = runner
        self.cache = cache
        self.lookup = lookup
        self.eos_ids = frozenset(eos_ids)
        self.max_batch_size = max_batch_size
        self.prefill_tokens = prefill_tokens
        self.metrics: EngineMetrics = metrics or NoMetrics()
        self._cond = threading.Condition()
        self._incoming: list[Request] = []  # submitted, not yet seen by the loop (guarded by _cond)
        self._dirty = False  # something outside the loop changed: submit, cancel, a load ended
        self._closed = False
        self._watching: set[str] = set()  # adapters a watcher thread waits on (guarded by _cond)
        self._waiting: deque[Request] = deque()  # loop thread only
        self._running: list[Request] = []  # loop thread only
        self._reported: tuple[int, int] | None = None
        self.iterations = 0  # loop passes, each one a step (tests check that an idle loop sleeps)
        self._thread = threading.Thread(target=self._loop, name="loraforge-engine", daemon=True)
        self._thread.start()

    # ---------------------------------------------------------- other threads
    def enqueue(self, request: Request) -> None:
        with self._cond:
            if self._closed:
                raise EngineClosedError("the engine is closed")
            self._incoming.append(request)
            self._dirty = True
            self._cond.notify()

    def wake(self) -> None:
        with self._cond:
            self._dirty = True
            self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        if self._thread is not threading.current_thread():
            self._thread.join()

    # ---------------------------------------------------------- loop thread
    def _loop(self) -> None:
        progressed = False
        with torch.inference_mode():
            while True:
                with self._cond:
                    if not (progressed or self._dirty or self._closed):
                        # Idle: sleep until a submit/cancel/load wakes us; poll only while requests wait on loads.
                        self._cond.wait(timeout=LOAD_POLL_S if self._waiting else None)
                    self._dirty = False
                    if self._closed:
                        break
                    self._waiting.extend(self._incoming)
                    self._incoming.clear()
                self.iterations += 1
                try:
                    progressed = self._step()
                except Exception as err:  # a bug must not leave clients waiting forever
                    log.exception("engine step failed")
                    for request in list(self._running):
                        self._retire(request, err)
                    progressed = False
        self._shutdown()

    def _step(self) -> bool:
        progressed = self._drop_cancelled()
        progressed |= self._admit()
        self._report_queue()
        plan = self._plan()
        if not plan:
            return progressed
        logits = self.runner.forward([chunk for _, chunk in plan])
        # A chunk that reaches the end of the prompt (a last prefill chunk or a decode token) picks a token.
        rows = [i for i, (r, chunk) in enumerate(plan) if chunk.start + len(chunk.token_ids) >= len(r.prompt_ids)]
        for request, chunk in plan:
            request.cached = chunk.start + len(chunk.token_ids)
        if rows:
            tokens = choose_tokens([plan[i][0].sampler for i in rows], logits[rows])
            for i, token in zip(rows, tokens, strict=True):
                self._advance(plan[i][0], token)
        self._report_queue()
        return True

    def _drop_cancelled(self) -> bool:
        dropped = False
        for request in [r for r in self._running if r.stream.cancelled]:
            self._retire(request, None)
            dropped = True
        if any(r.stream.cancelled for r in self._waiting):
            self._waiting = deque(r for r in self._waiting if not r.stream.cancelled)
            dropped = True
        return dropped

    def _admit(self) -> bool:
        admitted = False
        still_waiting: deque[Request] = deque()
        while self._waiting:
            request = self._waiting.popleft()
            if len(self._running) >= self.max_batch_size:
                still_waiting.append(request)
                still_waiting.extend(self._waiting)
                self._waiting.clear()
                break
            try:
                weights = self._fetch(request)
            except Exception as err:  # unknown (removed) model or an adapter that failed to load
                request.stream.fail(err)
                continue
            if request.adapter is not None and weights is None:
                still_waiting.append(request)  # loading in the background: let the others pass
                self._watch(request.adapter)
                continue
            if weights is not None:
                self.cache.acquire(weights)
            request.weights = weights
            request.slot = self.runner.alloc()
            self._running.append(request)
            admitted = True
        self._waiting = still_waiting
        return admitted

    def _fetch(self, request: Request) -> AdapterWeights | None:
        if request.adapter is None:
            return None
        weights = self.lookup(request.adapter)
        if not request.looked_up:  # count a request once, not once per step it waits
            request.looked_up = True
            self.metrics.cache_lookup(request.model, weights is not None)
        return weights

    def _watch(self, adapter: str) -> None:
        """Wake the loop when `adapter` becomes resident (or fails), so waiting costs no polling."""
        with self._cond:
            if adapter in self._watching:
                return
            self._watching.add(adapter)

        def wait() -> None:
            try:
                self.cache.wait_resident(adapter, timeout=600)
            except Exception:  # noqa: BLE001 - the next lookup reports the failure to the request
                pass
            finally:
                with self._cond:
                    self._watching.discard(adapter)
                    self._dirty = True
                    self._cond.notify()

        threading.Thread(target=wait, name=f"loraforge-wait-{adapter}", daemon=True).start()

    def _plan(self) -> list[tuple[Request, SeqChunk]]:
        """This step's chunks: one decode token per prefilled request, then prompt chunks within the budget."""
        plan: list[tuple[Request, SeqChunk]] = []
        budget = self.prefill_tokens
        for request in self._running:
            assert request.slot is not None
            if request.prefilled:
                token_ids, start = [request.output_ids[-1]], request.cached
            elif budget > 0:
                start = request.cached
                token_ids = request.prompt_ids[start : start + budget]
                budget -= len(token_ids)
            else:
                continue
            plan.append((request, SeqChunk(request.slot, token_ids, start, request.weights)))
        return plan

    def _advance(self, request: Request, token: int) -> None:
        now = time.monotonic()
        if not request.output_ids:
            self.metrics.first_token(request.model, now - request.submitted)
        request.output_ids.append(token)
        at_eos = token in self.eos_ids and not request.params.ignore_eos
        if not at_eos:
            request.detok.add(token)
        finish: FinishReason | None = None
        if at_eos or request.detok.stopped:
            finish = "stop"
        elif len(request.output_ids) >= request.params.max_tokens:
            finish = "length"
        text = request.detok.finish() if finish else request.detok.take()
        request.stream.push(
            Delta(text, (token,), finish, len(request.prompt_ids), len(request.output_ids))
        )
        if finish:
            self._retire(request, None)

    def _retire(self, request: Request, error: BaseException | None) -> None:
        self._running.remove(request)
        if request.slot is not None:
            self.runner.free(request.slot)
            request.slot = None
        if request.weights is not None:
            self.cache.release(request.weights)
            request.weights = None
        if error is not None:
            request.stream.fail(error)
        if request.output_ids:
            self.metrics.generated(request.model, len(request.output_ids), time.monotonic() - request.submitted)

    def _report_queue(self) -> None:
        counts = (len(self._waiting), len(self._running))
        if counts != self._reported:
            self._reported = counts
            self.metrics.queue_length(*counts)

    def _shutdown(self) -> None:
        closed = EngineClosedError("the engine closed before the request finished")
        for request in list(self._running):
            self._retire(request, closed)
        with self._cond:
            self._waiting.extend(self._incoming)
            self._incoming.clear()
        for request in self._waiting:
            request.stream.fail(closed)
        self._waiting.clear()
