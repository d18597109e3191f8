"""The serving engine: one base model, many LoRA adapters, continuous batching across them (plain torch).

`Engine` validates requests and manages the served adapters; the loop in `scheduler` batches the requests
of every adapter together on the `runner`, with adapter weights from the `adapter_cache`."""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from loraforge.errors import ModelError
from loraforge.serve.engine.errors import (
    ContextLengthError,
    InvalidParameterError,
    RequestError,
    UnknownModelError,
)
from loraforge.serve.engine.folders import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    PICKLED_ADAPTER_WEIGHTS,
    check_adapter_dir,
)
from loraforge.serve.engine.sampling import SamplingParams
from loraforge.serve.engine.scheduler import (
    Delta,
    EngineClosedError,
    EngineMetrics,
    RequestCancelledError,
    RequestStream,
    Scheduler,
    new_request,
)
from loraforge.serve.engine.types import (
    BASE_ALIAS,
    Completion,
    FinishReason,
    context_length_of,
    cut_at_stop,
    eos_token_ids,
)

DEFAULT_MAX_LEN = 2048  # KV length per slot when the model states no context length


@dataclass(frozen=True)
class ModelInfo:
    name: str
    kind: Literal["base", "adapter"]
    state: str  # "resident" for the base; an adapter's cache state: registered, loading, resident, failed
    content_hash: str | None
    rank: int | None
    pinned: bool


class Engine:
    """Base model + named adapters behind one continuous-batching loop; thread-safe.

    Adapters load into the cache on their first request (pinned ones at start and never evicted);
    `submit` streams a completion, `complete` waits for it."""

    def __init__(
        self,
        model_path: str,
        adapters: Mapping[str, str | Path] | None = None,
        *,
        device: str = "cpu",
        base_name: str = BASE_ALIAS,
        max_new_tokens_limit: int = 256,
        max_batch_size: int = 32,
        cache_bytes: int | None = None,
        pinned: Sequence[str] = (),
        metrics: EngineMetrics | None = None,
        max_len: int | None = None,
        prefill_tokens: int = 512,
    ):
        import torch

        from loraforge.resolve import load_model, load_tokenizer
        from loraforge.serve.engine.adapter_cache import AdapterCache
        from loraforge.serve.engine.adapter_weights import read_adapter
        from loraforge.serve.engine.runner import ModelRunner

        adapters = dict(adapters or {})
        self.base_name = base_name
        for name in adapters:
            self._check_name(name)
        folders = {name: check_adapter_dir(path) for name, path in adapters.items()}
        unknown_pins = sorted(set(pinned) - set(folders))
        if unknown_pins:
            raise ModelError(f"pinned adapters {unknown_pins} are not among the served adapters {sorted(folders)}")

        self.max_new_tokens_limit = max_new_tokens_limit
        self.device = torch.device(device)
        self.tokenizer = load_tokenizer(model_path)
        base = load_model(model_path).to(self.device).eval()
        self.eos_token_ids = eos_token_ids(base, self.tokenizer)
        model_limit = context_length_of(base.config, self.tokenizer)
        limits = [n for n in (model_limit, max_len) if n]
        kv_len = min(limits) if limits else DEFAULT_MAX_LEN
        self.runner = ModelRunner(base, max_slots=max_batch_size, max_len=kv_len)
        self.context_length: int | None = self.runner.max_len  # what a request may use: prompt + max_tokens

        self._lock = threading.Lock()  # guards the served-adapter registry below
        self._adapters: dict[str, int | None] = {}  # served adapter name -> rank from its config, in order
        runner = self.runner

        def read(name: str, folder: Path):
            weights = read_adapter(name, folder, base)
            runner.check_adapter(weights)  # an adapter the batched forward cannot apply fails its load, not a step
            return weights

        self.cache = AdapterCache(read, budget_bytes=cache_bytes)
        try:
            for name, folder in folders.items():
                self.add_adapter(name, folder, pin=name in pinned)
            self.scheduler = Scheduler(
                self.runner, self.cache, self._lookup, self.eos_token_ids, max_batch_size=max_batch_size,
                prefill_tokens=prefill_tokens, metrics=metrics,
            )
        except BaseException:
            self.cache.close()
            raise

    # ------------------------------------------------------------------ served models
    def models(self) -> list[str]:
        with self._lock:
            return [self.base_name, *self._adapters]

    def model_info(self) -> list[ModelInfo]:
        entries = {entry.name: entry for entry in self.cache.entries()}
        with self._lock:
            ranks = dict(self._adapters)
        infos = [ModelInfo(self.base_name, "base", "resident", None, None, True)]
        for name, rank in ranks.items():
            if name in entries:
                infos.append(self._info(entries[name], rank))
        return infos

    def add_adapter(self, name: str, folder: str | Path, *, pin: bool = False) -> ModelInfo:
        """Serve `folder` as `name`; a name already served is replaced (requests running on it finish with
        the old weights, later ones get the new). pin=True loads it now and never evicts it."""
        self._check_name(name)
        entry = self.cache.register(name, check_adapter_dir(folder), pin=pin)
        rank = _config_rank(entry.folder)
        with self._lock:
            self._adapters[name] = rank
        return self._info(entry, rank)

    def remove_adapter(self, name: str) -> None:
        """Stop serving `name`: running requests finish, new ones get UnknownModelError."""
        with self._lock:
            if name not in self._adapters:
                raise UnknownModelError(name, [self.base_name, *self._adapters])
            del self._adapters[name]
        self.cache.unregister(name)

    def _check_name(self, name: str) -> None:
        if name in (self.base_name, BASE_ALIAS):
            raise ModelError(f"adapter name {name!r} clashes with the base model's served name")
        if not name or name != name.strip():
            raise ModelError(f"adapter name {name!r} is empty or has surrounding spaces")

    def _adapter_for(self, model: str) -> str | None:
        if model in (self.base_name, BASE_ALIAS):
            return None
        with self._lock:
            if model in self._adapters:
                return model
        raise UnknownModelError(model, self.models())

    def _lookup(self, adapter: str):
        """For the loop: the adapter's resident weights, None while it loads; UnknownModelError once removed."""
        self._adapter_for(adapter)
        return self.cache.get(adapter)

    @staticmethod
    def _info(entry, rank: int | None) -> ModelInfo:
        return ModelInfo(entry.name, "adapter", entry.state, entry.content_hash, rank, entry.pinned)

    # ------------------------------------------------------------------ requests
    def submit(self, prompt: str | Sequence[int], model: str, params: SamplingParams) -> RequestStream:
        """Validate and queue a request; its deltas stream from the returned RequestStream. Request errors
        are raised here, before anything is queued."""
        adapter = self._adapter_for(model)
        self._check_params(params)
        ids = self._prompt_ids(prompt)
        self._check_length(len(ids), params.max_tokens)
        request = new_request(model, adapter, ids, params, self.tokenizer, self.scheduler.wake)
        self.scheduler.enqueue(request)
        return request.stream

    def complete(
        self,
        prompt: str,
        model: str,
        max_tokens: int = 16,
        temperature: float = 1.0,
        top_p: float = 1.0,
        stop: list[str] | None = None,
        seed: int | None = None,
    ) -> Completion:
        params = SamplingParams(max_tokens, temperature, top_p, tuple(stop or ()), seed)
        return self.submit(prompt, model, params).result()

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        """The prompt for a chat: the tokenizer's chat template with the generation prompt added."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise InvalidParameterError(
                "this model has no chat template; send a plain prompt to /v1/completions instead", "messages"
            )
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def encode(self, prompt: str) -> list[int]:
        # A chat-rendered prompt already starts with bos; add special tokens only to raw text.
        bos = self.tokenizer.bos_token
        add_special = not (bos and prompt.startswith(bos))
        return list(self.tokenizer(prompt, add_special_tokens=add_special)["input_ids"])

    def close(self) -> None:
        self.scheduler.close()
        self.cache.close()

    def _check_params(self, params: SamplingParams) -> None:
        if not 1 <= params.max_tokens <= self.max_new_tokens_limit:
            raise InvalidParameterError(
                f"max_tokens must be between 1 and {self.max_new_tokens_limit}, got {params.max_tokens}", "max_tokens"
            )
        if not 0 <= params.temperature <= 2:
            raise InvalidParameterError(
                f"temperature must be between 0 and 2, got {params.temperature}", "temperature"
            )
        if not 0 < params.top_p <= 1:
            raise InvalidParameterError(f"top_p must be above 0 and at most 1, got {params.top_p}", "top_p")
        if not all(isinstance(s, str) for s in params.stop):
            raise InvalidParameterError("stop must be a string or a list of strings", "stop")

    def _prompt_ids(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            ids = self.encode(prompt)
        else:
            ids = [int(i) for i in prompt]
            vocab = self.runner.vocab_size
            bad = [i for i in ids if not 0 <= i < vocab]
            if bad:
                raise InvalidParameterError(
                    f"prompt token ids must be between 0 and {vocab - 1}, got {bad[:5]}", "prompt"
                )
        if not ids:
            raise InvalidParameterError("prompt is empty", "prompt")
        return ids

    def _check_length(self, n_prompt: int, max_tokens: int) -> None:
        limit = self.context_length
        if limit is not None and n_prompt + max_tokens > limit:
            raise ContextLengthError(
                f"This model's maximum context length is {limit} tokens. However, you "
                f"requested {n_prompt + max_tokens} tokens ({n_prompt} in the prompt, {max_tokens} for the "
                "completion). Please reduce the prompt or max_tokens.",
                "prompt" if n_prompt >= limit else "max_tokens",
            )


def _config_rank(folder: Path) -> int | None:
    """The largest rank an adapter's config declares (rank_pattern included), for model listings."""
    try:
        config = json.loads((folder / ADAPTER_CONFIG).read_text())
        return max([int(config["r"]), *(int(r) for r in (config.get("rank_pattern") or {}).values())])
    except (OSError, ValueError, KeyError, TypeError):
        return None


__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "BASE_ALIAS",
    "PICKLED_ADAPTER_WEIGHTS",
    "Completion",
    "ContextLengthError",
    "Delta",
    "Engine",
    "EngineClosedError",
    "EngineMetrics",
    "FinishReason",
    "InvalidParameterError",
    "ModelInfo",
    "RequestCancelledError",
    "RequestError",
    "RequestStream",
    "SamplingParams",
    "UnknownModelError",
    "check_adapter_dir",
    "cut_at_stop",
]
