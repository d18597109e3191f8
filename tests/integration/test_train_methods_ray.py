"""Fine-tuning methods on 2 Ray workers follow the one-process run step for step.

The loss is normalised by the global batch, so with the same seed every world size gives the same curve.
- lora_ga under ddp: each worker estimates the gradient on its half of every batch and the sums are
  all-reduced; the initial A, B (and so the whole curve) must match the one-process estimate.
- qlora under fsdp: FSDP2 shards the packed 4-bit base weights across the workers and all-gathers them
  for each layer; bitsandbytes must still dequantise them with their (double-quantised) constants.
"""

from __future__ import annotations

import math
import time

import pytest
import torch

from loraforge.adapters import load_tuned
from loraforge.context import StageContext
from loraforge.spec import TrainSpec
from loraforge.train.sft_data import collate, read_training_conversations, tokenize_conversation
from loraforge.train.trainer import TrainResult, run_train

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_torch_thread")]  # one thread: see tests/conftest.py

STEPS = 5


def _spec(lab, method: str, **overrides) -> TrainSpec:
    task = sorted(lab.tasks)[0]
    base = dict(method=method, data=f"lab://tasks/{task}_train.jsonl", num_workers=2, max_steps=STEPS,
                batch_size=8, learning_rate=5e-3, checkpoint_every=STEPS, max_seq_len=64, seed=5,
                lora={"r": 4, "alpha": 8})
    return TrainSpec(**{**base, **overrides})


def _train(label: str, spec: TrainSpec, tmp_path) -> TrainResult:
    start = time.monotonic()
    result = run_train(spec, StageContext(run_dir=tmp_path / label.replace(" ", "_"), model="lab"))
    print(f"\n[train methods] {label}: {time.monotonic() - start:.1f} s, losses {[round(x, 4) for x in result.losses]}")
    return result


@pytest.fixture(scope="module")
def probe(lab):
    from loraforge.resolve import load_tokenizer

    tok = load_tokenizer(str(lab.model_dir))
    convs = read_training_conversations(f"lab://tasks/{sorted(lab.tasks)[0]}_train.jsonl")[:4]
    return collate([tokenize_conversation(tok, c, 64) for c in convs], pad_id=tok.pad_token_id)


def _logits(lab, probe, folder) -> torch.Tensor:
    model = load_tuned(str(lab.model_dir), folder).eval()
    with torch.no_grad():
        return model(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits


@pytest.mark.parametrize(("method", "strategy"), [("lora_ga", "ddp"), ("qlora", "fsdp")])
def test_two_workers_follow_the_one_process_run(method, strategy, ray_cluster, lab, probe, tmp_path):
    extra = {"lora_ga": {"grad_batches": 2}} if method == "lora_ga" else {}
    local = _train(f"{method} num_workers=0", _spec(lab, method, num_workers=0, **extra), tmp_path)
    spread = _train(f"{method} {strategy} 2 workers", _spec(lab, method, strategy=strategy, **extra), tmp_path)
    assert spread.steps == STEPS and all(math.isfinite(x) for x in spread.losses)
    assert spread.losses == pytest.approx(local.losses, rel=2e-3)
    assert spread.losses[-1] < spread.losses[0]
    assert torch.allclose(_logits(lab, probe, spread.adapter_dir), _logits(lab, probe, local.adapter_dir),
                          atol=2e-2, rtol=1e-3)
