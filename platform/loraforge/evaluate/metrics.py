"""Evaluation metrics as plain torch functions: exact-match accuracy and perplexity."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def normalise_answer(text: str) -> str:
    return " ".join(text.strip().split())


@torch.no_grad()
def generate_greedy(
    model, tokenizer, prompts: Sequence[str], max_new_tokens: int, batch_size: int = 16
) -> list[str]:
    """Greedy completions for chat-rendered prompts, batched with left padding."""
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    outs: list[str] = []
    try:
        for i in range(0, len(prompts), batch_size):
            chunk = list(prompts[i : i + batch_size])
            enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False)
            gen = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            new = gen[:, enc["input_ids"].shape[1] :]
            outs += tokenizer.batch_decode(new, skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return outs


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    if not references:
        raise ValueError("exact_match needs at least one reference")
    hits = sum(normalise_answer(p) == normalise_answer(r) for p, r in zip(predictions, references, strict=True))
    return hits / len(references)


@torch.no_grad()
def perplexity(model, tokenizer, text: str, seq_len: int = 256) -> float:
    """exp(mean next-token loss) over non-overlapping windows of `seq_len` tokens."""
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    if ids.numel() < 2:
        raise ValueError("perplexity needs at least two tokens of text")
    total, count = 0.0, 0
    for start in range(0, ids.numel() - 1, seq_len):
        window = ids[start : start + seq_len + 1].unsqueeze(0)
        if window.shape[1] < 2:
            break
        logits = model(input_ids=window[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(), window[:, 1:].reshape(-1), reduction="sum"
        )
        total += float(loss)
        count += window.shape[1] - 1
    return math.exp(total / count)
