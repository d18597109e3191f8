"""The one-request-at-a-time PEFT engine: base model + named adapters, the active adapter switched per
request under a lock. It is the reference the batching engine is checked against ("PEFT switching")."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from contextlib import nullcontext
from pathlib import Path

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from loraforge.errors import ModelError
from loraforge.resolve import load_model, load_tokenizer
from loraforge.serve.engine.errors import ContextLengthError, InvalidParameterError, UnknownModelError
from loraforge.serve.engine.folders import check_adapter_dir
from loraforge.serve.engine.types import (
    BASE_ALIAS,
    Completion,
    FinishReason,
    context_length_of,
    cut_at_stop,
    eos_token_ids,
)


class _StopOnText(StoppingCriteria):
    """Stopping criterion: the decoded completion contains a stop string (which may span tokens)."""

    def __init__(self, tokenizer, prompt_len: int, stop: list[str]):
        self.tokenizer, self.prompt_len, self.stop = tokenizer, prompt_len, stop

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        text = self.tokenizer.decode(input_ids[0, self.prompt_len :], skip_special_tokens=True)
        done = any(s in text for s in self.stop)
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)


# ---------------------------------------------------------------- the engine
class PeftEngine:
    """Base model + adapters loaded once; `complete` serves any of them by name."""

    def __init__(
        self,
        model_path: str,
        adapters: Mapping[str, str | Path] | None = None,
        device: str = "cpu",
        base_name: str = BASE_ALIAS,
        max_new_tokens_limit: int = 256,
    ):
        adapters = dict(adapters or {})
        for name in adapters:
            if name in (base_name, BASE_ALIAS):
                raise ModelError(f"adapter name {name!r} clashes with the base model's served name")
        folders = {name: check_adapter_dir(path) for name, path in adapters.items()}

        self.base_name = base_name
        self.max_new_tokens_limit = max_new_tokens_limit
        self.device = torch.device(device)
        self.tokenizer = load_tokenizer(model_path)
        base = load_model(model_path).to(self.device).eval()
        self.context_length = context_length_of(base.config, self.tokenizer)
        self.eos_token_ids = eos_token_ids(base, self.tokenizer)
        self.model = base
        if folders:
            from peft import PeftModel

            (first, first_dir), *rest = folders.items()
            try:
                self.model = PeftModel.from_pretrained(base, str(first_dir), adapter_name=first)
                for name, folder in rest:
                    self.model.load_adapter(str(folder), adapter_name=name)
            except (OSError, ValueError, RuntimeError, KeyError) as err:
                raise ModelError(f"cannot load adapters {list(folders)} onto {model_path!r}: {err}") from None
            self.model.eval()
        self.adapter_names = list(folders)
        self._lock = threading.Lock()  # one request at a time: the active adapter is model-wide state

    def models(self) -> list[str]:
        return [self.base_name, *self.adapter_names]

    def _adapter_for(self, model: str) -> str | None:
        if model in (self.base_name, BASE_ALIAS):
            return None
        if model in self.adapter_names:
            return model
        raise UnknownModelError(model, self.models())

    def _check_params(self, max_tokens: int, temperature: float, top_p: float) -> None:
        if not 1 <= max_tokens <= self.max_new_tokens_limit:
            raise InvalidParameterError(
                f"max_tokens must be between 1 and {self.max_new_tokens_limit}, got {max_tokens}", "max_tokens"
            )
        if not 0 <= temperature <= 2:
            raise InvalidParameterError(f"temperature must be between 0 and 2, got {temperature}", "temperature")
        if not 0 < top_p <= 1:
            raise InvalidParameterError(f"top_p must be above 0 and at most 1, got {top_p}", "top_p")

    def encode(self, prompt: str) -> torch.Tensor:
        # A chat-rendered prompt already starts with bos; add special tokens only to raw text.
        bos = self.tokenizer.bos_token
        add_special = not (bos and prompt.startswith(bos))
        ids = self.tokenizer(prompt, add_special_tokens=add_special, return_tensors="pt")["input_ids"]
        return ids.to(self.device)

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
        adapter = self._adapter_for(model)
        self._check_params(max_tokens, temperature, top_p)
        stop = [s for s in (stop or []) if s]
        input_ids = self.encode(prompt)
        n_prompt = input_ids.shape[1]
        if n_prompt == 0:
            raise InvalidParameterError("prompt is empty", "prompt")
        if self.context_length is not None and n_prompt + max_tokens > self.context_length:
            raise ContextLengthError(
                f"This model's maximum context length is {self.context_length} tokens. However, you "
                f"requested {n_prompt + max_tokens} tokens ({n_prompt} in the prompt, {max_tokens} for the "
                "completion). Please reduce the prompt or max_tokens.",
                "prompt" if n_prompt >= self.context_length else "max_tokens",
            )

        gen_kwargs: dict = dict(
            max_new_tokens=max_tokens,
            do_sample=temperature > 0,
            repetition_penalty=1.0,
            eos_token_id=self.eos_token_ids,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        if temperature > 0:
            # Explicit top_k=0 so a model's own generation_config (often top_k=50) cannot change
            # OpenAI's sampling semantics.
            gen_kwargs |= dict(temperature=temperature, top_p=top_p, top_k=0)
        if stop:
            gen_kwargs["stopping_criteria"] = StoppingCriteriaList([_StopOnText(self.tokenizer, n_prompt, stop)])

        with self._lock:
            if adapter is not None:
                self.model.set_adapter(adapter)
                scope = nullcontext()
            else:
                scope = self.model.disable_adapter() if self.adapter_names else nullcontext()
            if seed is not None:
                torch.manual_seed(seed)  # global RNG, but only this request samples while the lock is held
            with scope, torch.inference_mode():
                out = self.model.generate(
                    input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **gen_kwargs
                )
        new_ids = out[0, n_prompt:].tolist()
        ended_at_eos = bool(new_ids) and new_ids[-1] in self.eos_token_ids
        text = self.tokenizer.decode(new_ids, skip_special_tokens=True)
        text, hit_stop = cut_at_stop(text, stop)
        finish: FinishReason = "stop" if ended_at_eos or hit_stop else "length"
        return Completion(text, n_prompt, len(new_ids), finish)
