"""LoRA through PEFT on the lab model: init is a no-op, save/load reproduces the trained logits."""

from __future__ import annotations

import json
import math

import pytest
import torch

from loraforge.adapters import ADAPTERS, build_adapter, save_adapter
from loraforge.adapters.lora import load_adapter
from loraforge.spec import LoraSpec, TrainSpec
from loraforge.train.objectives import LOSS_DENOMINATOR, predicted_label_count, sft_loss
from loraforge.train.schedule import learning_rate_at
from loraforge.train.sft_data import IGNORE_INDEX, collate, tokenize_conversation

CONVS = [
    [{"role": "user", "content": "Add 2 and 3."}, {"role": "assistant", "content": "5"}],
    [{"role": "user", "content": "Reverse: abc"}, {"role": "assistant", "content": "the reversed word is cba"}],
]


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: see tests/conftest.py


@pytest.fixture(scope="module")
def lab_model_dir(lab):
    return str(lab.model_dir)


def _base(model_dir: str):
    from loraforge.resolve import load_model

    torch.manual_seed(0)
    return load_model(model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def batch(lab_model_dir):
    from loraforge.resolve import load_tokenizer

    tok = load_tokenizer(lab_model_dir)
    return collate([tokenize_conversation(tok, c, 64) for c in CONVS], pad_id=tok.pad_token_id)


def test_lora_init_leaves_output_unchanged_and_targets_all_linear(lab_model_dir, batch):
    base = _base(lab_model_dir)
    with torch.no_grad():
        before = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    model = build_adapter(base, TrainSpec(lora=LoraSpec(r=4, alpha=8)))
    with torch.no_grad():
        after = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.equal(before, after)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    wrapped = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if hasattr(m, "lora_A")}
    assert {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"} <= wrapped
    assert "lm_head" not in wrapped
    assert set(ADAPTERS) >= {"lora"}


def test_sft_loss_matches_hf_loss_and_ignores_unlabelled(lab_model_dir, batch):
    model = _base(lab_model_dir)
    with torch.no_grad():
        ours = sft_loss(model, batch)
        theirs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       labels=batch["labels"]).loss
        assert torch.allclose(ours, theirs, rtol=1e-5)
        unlabelled = dict(batch, labels=torch.full_like(batch["labels"], IGNORE_INDEX))
        assert sft_loss(model, unlabelled).item() == 0.0


def test_global_denominator_makes_the_loss_independent_of_the_split(lab_model_dir, batch):
    """Two 'ranks' each dividing by half the global label count average to the whole-batch loss."""
    model = _base(lab_model_dir)
    halves = [{k: v[i : i + 1] for k, v in batch.items()} for i in range(2)]
    assert predicted_label_count(halves[0]) != predicted_label_count(halves[1])  # uneven split
    denominator = predicted_label_count(batch).float() / 2
    with torch.no_grad():
        whole = sft_loss(model, batch)
        per_rank = [sft_loss(model, {**h, LOSS_DENOMINATOR: denominator}) for h in halves]
        naive = [sft_loss(model, h) for h in halves]
    assert torch.allclose((per_rank[0] + per_rank[1]) / 2, whole, rtol=1e-5)
    assert not torch.allclose((naive[0] + naive[1]) / 2, whole, rtol=1e-3)


def test_adapter_save_load_round_trip(lab_model_dir, batch, tmp_path):
    spec = TrainSpec(lora=LoraSpec(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    model = build_adapter(_base(lab_model_dir), spec)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    first = None
    model.train()
    for _ in range(5):
        loss = sft_loss(model, batch)
        first = first if first is not None else loss.item()
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert loss.item() < first
    model.eval()
    with torch.no_grad():
        trained = model(input_ids=batch["input_ids"]).logits
    out = save_adapter(model, tmp_path / "adapter")
    assert (out / "adapter_model.safetensors").is_file()
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8 and set(cfg["target_modules"]) == {"q_proj", "v_proj"}

    loaded = load_adapter(_base(lab_model_dir), out).eval()
    fresh_base = _base(lab_model_dir)
    with torch.no_grad():
        reloaded = loaded(input_ids=batch["input_ids"]).logits
        base_logits = fresh_base(input_ids=batch["input_ids"]).logits
    assert torch.allclose(reloaded, trained, atol=1e-5)
    assert not torch.allclose(base_logits, trained, atol=1e-3)  # the adapter does change the model


def test_learning_rate_schedule():
    lrs = [learning_rate_at(s, peak=1.0, warmup_steps=4, max_steps=20) for s in range(20)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert math.isclose(lrs[4], 1.0) and math.isclose(lrs[-1], 0.1)
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:], strict=False))
