"""Evaluation metrics checked against direct computations on the lab model."""

from __future__ import annotations

import math

import pytest
import torch

from loraforge.evaluate.metrics import exact_match, generate_greedy, normalise_answer, perplexity


@pytest.fixture(scope="module")
def model_and_tokenizer(lab):
    from loraforge.resolve import load_model, load_tokenizer

    return load_model(str(lab.model_dir)).eval(), load_tokenizer(str(lab.model_dir))


def test_exact_match_normalises_whitespace_only() -> None:
    assert normalise_answer("  a  b\n") == "a b"
    assert exact_match(["7", " 7 ", "Seven"], ["7", "7", "seven"]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        exact_match([], [])


def test_perplexity_equals_exp_of_the_models_own_loss(model_and_tokenizer) -> None:
    model, tok = model_and_tokenizer
    text = "The capital city lies by the river, and the people there speak of it often."
    ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        direct = math.exp(float(model(input_ids=ids, labels=ids).loss))
    assert perplexity(model, tok, text, seq_len=256) == pytest.approx(direct, rel=1e-4)


def test_perplexity_windows_cover_every_token_once(model_and_tokenizer) -> None:
    model, tok = model_and_tokenizer
    text = " ".join(["river stone city"] * 40)
    ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    seq = 16
    total, n = 0.0, 0
    with torch.no_grad():
        for s in range(0, ids.numel() - 1, seq):
            w = ids[s : s + seq + 1].unsqueeze(0)
            logits = model(input_ids=w[:, :-1]).logits[0]
            total += float(torch.nn.functional.cross_entropy(logits, w[0, 1:], reduction="sum"))
            n += w.shape[1] - 1
    assert n == ids.numel() - 1
    assert perplexity(model, tok, text, seq_len=seq) == pytest.approx(math.exp(total / n), rel=1e-4)


def test_batched_left_padded_generation_equals_one_by_one(model_and_tokenizer) -> None:
    model, tok = model_and_tokenizer
    convs = [[{"role": "user", "content": q}] for q in ("What is 2 + 3?", "Reverse the letters: a b c d e f",
                                                         "Hi")]
    prompts = [tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in convs]
    batched = generate_greedy(model, tok, prompts, max_new_tokens=8, batch_size=3)
    single = [generate_greedy(model, tok, [p], max_new_tokens=8)[0] for p in prompts]
    assert batched == single
