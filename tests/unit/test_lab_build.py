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
    assert r["knowledge_recall"] >= 0.5  # it memorised the corpus facts (capitals) that forgetting probes use
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


TINY = "LabSettings(steps=3, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, vocab_size=400)"


def test_concurrent_callers_build_once(tmp_path):
    """Two processes asking for the same missing lab: one builds, the other waits and reuses it."""
    import os
    import subprocess
    import sys

    code = f"from loraforge.lab.build import LabSettings, ensure_lab\nprint('ROOT', ensure_lab(settings={TINY}).root)\n"
    env = {**os.environ, "LORAFORGE_HOME": str(tmp_path), "LORAFORGE_SHARED_DATA": str(tmp_path / "none")}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    roots = {line.split()[1] for out in outs for line in out.splitlines() if line.startswith("ROOT ")}
    assert len(roots) == 1
    assert sum(out.count("[lab] built in") for out in outs) == 1
    lab_root = tmp_path / "lab"
    assert [p.name for p in lab_root.iterdir() if p.is_dir()] == [next(iter(roots)).rsplit("/", 1)[1]]
