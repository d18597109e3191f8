"""ensure_lab builds once, caches, and yields a loadable model that learned the general corpus."""

from __future__ import annotations

import json
import time

from loraforge.lab.build import LabSettings, ensure_lab, lab_key


def test_lab_is_cached_and_complete(lab):
    t = time.time()
    again = ensure_lab()
    assert time.time() - t < 2.0
    assert again.root == lab.root and again.root.name == lab_key()
    assert len(lab.tasks) >= 3
    for name in ("general_train.txt", "general_heldout.txt"):
        assert (lab.data_dir / name).stat().st_size > 10_000
    for task in lab.tasks:
        for split in ("train", "eval"):
            assert (lab.data_dir / "tasks" / f"{task}_{split}.jsonl").is_file()
    assert (lab.model_dir / "model.safetensors").is_file()
    assert json.loads((lab.root / "report.json").read_text()) == lab.report
    assert not list(lab.root.parent.glob(f".tmp-{lab.root.name}-*"))  # nothing half-built left behind


def test_settings_change_the_cache_key():
    assert lab_key(LabSettings()) != lab_key(LabSettings(steps=LabSettings().steps + 1))


def test_model_loads_and_learned_the_corpus(lab):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    r = lab.report
    assert r["perplexity_pretrained"] < 0.5 * r["perplexity_init"]
    assert r["perplexity_pretrained"] < r["vocab_size"] / 10
    model = AutoModelForCausalLM.from_pretrained(lab.model_dir)
    tok = AutoTokenizer.from_pretrained(lab.model_dir)
    assert model.config.model_type == "llama" and model.config.vocab_size == len(tok)
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "Repeat this word exactly.\n\nhello"}], tokenize=False, add_generation_prompt=True
    )
    enc = tok(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=20, do_sample=False, eos_token_id=tok.eos_token_id)
    # the base model knows the chat template: it answers and stops with eos
    assert tok.eos_token_id in out[0, enc["input_ids"].shape[1] :].tolist()
