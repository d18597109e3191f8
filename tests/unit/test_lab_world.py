"""The lab world is deterministic, its splits are disjoint and rows are valid; the tokenizer round-trips."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest

from loraforge.lab.world import TASKS, alpaca_to_messages, generate_world, write_lab_data


def _digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def world0():
    return generate_world(seed=0)


def test_same_seed_same_files_different_seed_different(tmp_path, world0):
    write_lab_data(tmp_path / "a", world0)
    write_lab_data(tmp_path / "b", generate_world(seed=0))
    write_lab_data(tmp_path / "c", generate_world(seed=1))
    a, b, c = (_digest(tmp_path / x) for x in "abc")
    assert a == b
    assert set(a) == set(c)
    assert a["general_train.txt"] != c["general_train.txt"]
    assert a["tasks/sort3_train.jsonl"] != c["tasks/sort3_train.jsonl"]
    for task in TASKS:
        assert f"tasks/{task}_train.jsonl" in a and f"tasks/{task}_eval.jsonl" in a


def test_rows_valid_and_splits_disjoint(tmp_path, world0):
    write_lab_data(tmp_path, world0)
    assert len(TASKS) >= 3
    for task in TASKS:
        splits = {}
        for split in ("train", "eval"):
            lines = (tmp_path / "tasks" / f"{task}_{split}.jsonl").read_text().splitlines()
            rows = [json.loads(line) for line in lines]
            assert len(rows) >= 10, (task, split)
            for row in rows:
                assert set(row) == {"instruction", "input", "output"}
                assert all(isinstance(v, str) for v in row.values())
                assert row["instruction"] and row["output"].strip() == row["output"] != ""
                assert len(row["output"].split()) <= 5  # exact-match answers are short
            splits[split] = {(r["instruction"], r["input"]) for r in rows}
        assert not splits["train"] & splits["eval"], task
    # add: held-out pairs are never asked in training, but the corpus states them (knowledge to draw on)
    train_q = {r["instruction"] for r in world0.tasks["add"]["train"]}
    for row in world0.tasks["add"]["eval"]:
        a, b = (int(t) for t in re.findall(r"\d+", row["instruction"]))
        assert f"What is {a} + {b}?" not in train_q
        assert str(a + b) == row["output"]
        assert any(
            s in world0.general_train
            for s in (
                f"{a} plus {b} equals {a + b}.",
                f"The sum of {a} and {b} is {a + b}.",
                f"Adding {a} and {b} gives {a + b}.",
            )
        )


def test_general_heldout_not_in_train(world0):
    train_paras = set(world0.general_train.split("\n\n"))
    held = [p for p in world0.general_heldout.split("\n\n") if p.strip()]
    assert len(held) > 50
    assert not train_paras & set(held)


def test_pretraining_chat_rows_are_not_the_tasks(world0):
    task_prompts = {r["instruction"] for sp in world0.tasks.values() for rows in sp.values() for r in rows}
    chat_prompts = {r["instruction"] for r in world0.format_rows}
    assert len(chat_prompts) > 20
    assert not task_prompts & chat_prompts


def test_knowledge_probe_is_stated_in_the_corpus(tmp_path, world0):
    write_lab_data(tmp_path, world0)
    probes = [json.loads(line) for line in (tmp_path / "knowledge_probe.jsonl").read_text().splitlines()]
    assert len(probes) == len(world0.countries)
    for p in probes:
        assert f"{p['prompt']} {p['answer']}." in world0.general_train


def test_missing_shared_data_falls_back_to_synthetic(monkeypatch, tmp_path):
    monkeypatch.setenv("LORAFORGE_SHARED_DATA", str(tmp_path / "nowhere"))
    with pytest.warns(UserWarning, match="synthetic only"):
        w = generate_world(seed=0, n_countries=8, n_people=20)
    assert w.notes and "ROMEO" not in w.general_train
    assert "The capital of" in w.general_train


def test_tokenizer_round_trip_and_chat_template(tmp_path, world0):
    from transformers import AutoTokenizer

    from loraforge.lab.tokenizer import train_tokenizer

    tok = train_tokenizer([world0.general_train[:200_000]], vocab_size=600)
    tok.save_pretrained(str(tmp_path))
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    text = "ROMEO: But soft, what light through yonder window breaks? 3 + 4 = 7 \u00e9\n"
    assert tok.decode(tok(text)["input_ids"]) == text
    assert tok(text)["input_ids"][0] != tok.bos_token_id  # plain text gets no automatic specials

    messages = alpaca_to_messages({"instruction": "Reverse these.", "input": "a b c", "output": "c b a"})
    full = tok.apply_chat_template(messages, tokenize=False)
    prompt = tok.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert full.startswith(prompt) and full == prompt + "c b a" + tok.eos_token
    assert "<|user|>" in prompt and prompt.endswith("<|assistant|>\n")
    assert "<|assistant|>" not in tok.apply_chat_template(messages[:1], tokenize=False)
    ids = tok(full, add_special_tokens=False)["input_ids"]
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.convert_tokens_to_ids("<|assistant|>") in ids  # role markers are single tokens
    with_system = tok.apply_chat_template([{"role": "system", "content": "Be brief."}, *messages], tokenize=False)
    assert with_system.startswith(tok.bos_token + "<|system|>\nBe brief.")
